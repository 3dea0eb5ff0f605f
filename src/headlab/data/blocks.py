"""Token blocks for language-model evaluation, and fingerprints of batches.

A corpus becomes one token stream (documents joined by the tokenizer's end-of-text token), cut into
non-overlapping blocks of ``seq_len`` tokens. Block order is shuffled with ``seed``; the first
``n_blocks`` form the evaluation batch and the next ``n_stats_blocks`` the statistics batch, so
the two never share a block.

BOS: by default each block starts with BOS exactly when the tokenizer itself adds one (Llama-2/3
do; GPT-2 and SmolLM2 do not). SmolLM2's declared BOS is the chat token ``<|im_start|>``, and
forcing it in front of plain text costs it accuracy (induction CE 2.9 -> 3.5 nats, names logit
difference 4.8 -> 3.8), so the tokenizer's own convention is the default; ``prepend_bos`` overrides.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

import torch

from headlab.batch import Batch
from headlab.errors import ConfigError

__all__ = ["batch_fingerprint", "bos_prefix", "make_blocks", "token_stream"]


def bos_prefix(tokenizer: Any, prepend_bos: bool | None = None) -> list[int]:
    """``[bos_token_id]`` or ``[]``. ``None``: BOS exactly when the tokenizer adds it itself."""
    bos = tokenizer.bos_token_id
    if prepend_bos is None:
        ids = tokenizer("a", add_special_tokens=True)["input_ids"]
        prepend_bos = bos is not None and len(ids) > 0 and ids[0] == bos
    if not prepend_bos:
        return []
    if bos is None:
        raise ConfigError("prepend_bos=True but the tokenizer has no BOS token; pass False")
    return [bos]


def token_stream(tokenizer: Any, texts: Sequence[str]) -> torch.Tensor:
    """All documents as one 1-D long tensor, separated by the tokenizer's EOS (else BOS, else SEP;
    no separator if it has none). No BOS/EOS is added inside a document."""
    if isinstance(texts, str):
        raise ConfigError("texts must be a list of documents, not one string; wrap it: [text]")
    separator = next(
        (
            t
            for t in (tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.sep_token_id)
            if t is not None
        ),
        None,
    )
    # verbose=False: documents longer than the model maximum are expected here (we cut them)
    encoded = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
    pieces: list[int] = []
    for i, ids in enumerate(encoded):
        if i and separator is not None:
            pieces.append(separator)
        pieces.extend(ids)
    return torch.tensor(pieces, dtype=torch.long)


def make_blocks(
    tokenizer: Any,
    texts: Sequence[str],
    *,
    seq_len: int,
    n_blocks: int,
    n_stats_blocks: int = 0,
    seed: int = 0,
    max_positions: int | None = None,
    prepend_bos: bool | None = None,
) -> tuple[Batch, Batch | None]:
    """Evaluation blocks and (if ``n_stats_blocks``) disjoint statistics blocks from ``texts``.

    Every token except column 0 (the BOS, when there is one) is a target (``target_mask``).
    ``prepend_bos``: see :func:`bos_prefix` (BOS counts toward ``seq_len``). Returns
    ``(eval, stats)``; ``stats`` is ``None`` when ``n_stats_blocks == 0``.
    """
    if seq_len < 2:
        raise ConfigError(f"seq_len must be at least 2 (one input and one target), got {seq_len}")
    if max_positions is not None and seq_len > max_positions:
        raise ConfigError(
            f"seq_len {seq_len} is longer than the model maximum of {max_positions} positions; "
            f"use seq_len <= {max_positions}"
        )
    if n_blocks < 1:
        raise ConfigError(f"n_blocks must be at least 1, got {n_blocks}")
    if n_stats_blocks < 0:
        raise ConfigError(f"n_stats_blocks must be >= 0, got {n_stats_blocks}")
    prefix = bos_prefix(tokenizer, prepend_bos)
    stream = token_stream(tokenizer, texts)
    body = seq_len - len(prefix)  # corpus tokens per block
    available = len(stream) // body
    needed = n_blocks + n_stats_blocks
    if available < needed:
        raise ConfigError(
            f"the corpus has {len(stream)} tokens: {available} blocks of seq_len {seq_len}, but "
            f"{needed} were requested ({n_blocks} eval + {n_stats_blocks} stats = "
            f"{needed * body} tokens); ask for fewer blocks (--n-blocks, --n-stats-blocks: only "
            "mean/median/peak/resample read the statistics, so zero ablation can use "
            "--n-stats-blocks 1), a shorter seq_len, or a larger corpus"
        )
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(available, generator=generator)[:needed]  # [block]
    index = chosen[:, None] * body + torch.arange(body)  # [block, body]
    ids = stream[index]  # [block, body]
    if prefix:
        ids = torch.cat([torch.full((needed, 1), prefix[0], dtype=torch.long), ids], dim=1)
    mask = torch.ones_like(ids, dtype=torch.bool)  # [block, pos]
    mask[:, 0] = False
    evaluation = Batch(input_ids=ids[:n_blocks], target_mask=mask[:n_blocks])
    stats = None
    if n_stats_blocks:
        stats = Batch(input_ids=ids[n_blocks:], target_mask=mask[n_blocks:])
    return evaluation, stats


def batch_fingerprint(batch: Batch) -> str:
    """sha256 over every field of ``batch``: names, dtypes, shapes and values."""
    h = hashlib.sha256()
    for f in fields(batch):
        value = getattr(batch, f.name)
        if value is None:
            h.update(f"{f.name}:None;".encode())
            continue
        tensor = value.detach().to("cpu").contiguous()
        h.update(f"{f.name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: hash the raw bits
            tensor = tensor.view(torch.int16)
        h.update(tensor.numpy().tobytes())
    return h.hexdigest()
