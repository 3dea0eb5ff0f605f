"""Targets by name: a built-in task (with its own metric) or a corpus (scored by cross-entropy),
as one evaluation batch. The one place that turns "``names``" or "``python-docs``" into
``(batch, metric)`` for off-target costs, forget sets and steering side effects."""

from __future__ import annotations

from typing import Any

from headlab.batch import Batch
from headlab.data.blocks import make_blocks
from headlab.data.corpora import load_texts
from headlab.data.tasks import TASKS, load_task

__all__ = ["target_batch"]


def target_batch(
    name: str,
    tokenizer: Any,
    *,
    n: int,
    seed: int = 0,
    seq_len: int | None = None,
    text_field: str = "text",
    max_positions: int | None = None,
    corpus_seq_len: int = 64,
    corpus_seed_offset: int = 0,
) -> tuple[Batch, str]:
    """``(batch, metric)`` of target ``name``: a task in :data:`TASKS` (``n`` examples, its own
    metric; ``seq_len`` applies to ``induction``) or a corpus name/path (``n`` blocks of
    ``seq_len or corpus_seq_len`` tokens drawn with seed ``seed + corpus_seed_offset``, ``ce``)."""
    if name in TASKS:
        seq = seq_len if name == "induction" else None
        task = load_task(name, tokenizer, n=n, seed=seed, seq_len=seq)
        return task.eval, task.metric
    batch, _ = make_blocks(
        tokenizer, load_texts(name, text_field=text_field), seq_len=seq_len or corpus_seq_len,
        n_blocks=n, seed=seed + corpus_seed_offset, max_positions=max_positions,
    )  # fmt: skip
    return batch, "ce"
