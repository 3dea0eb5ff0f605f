"""Attention mass on a token set (the raw attention-weight head score).

:func:`attention_mass`: per example and head, the attention that the *query positions* put on
their *key set*, summed over the keys and averaged over the queries that have at least one key.
Key sets never reach past the query (causal models cannot attend there).
Queries: ``answer_pos`` for task batches, else the positions that predict a scored token
(``target_mask`` shifted one left), else the last position. Key sets (``keys``):

``answer``     positions before the query holding the correct answer token (``names``: the
               indirect-object name in the prompt);
``wrong``      positions before the query holding the wrong answer token (``names``: the subject);
``induction``  for query ``q``, every ``k <= q`` whose previous token equals the token at ``q``
               (the token after an earlier occurrence of the current token; TransformerLens'
               induction pattern);
``context``    positions ``1 .. q-1`` (every earlier token except the first, where heads park
               attention they do not use, and except the query itself);
``previous``   position ``q - 1``;
``words``      every occurrence at or before the query of the given words (each as its token
               sequence, with and without a leading space); ``positions``: the given positions at
               or before the query (negative: from the end);
``auto``       ``answer`` for task batches whose correct answer occurs in the prompt,
               ``induction`` for batches without ``answer_pos`` that end in a repeated segment,
               else ``context``.

An example whose queries all have empty key sets is not measured (NaN).
:func:`attention_mass_scores` averages over the measured examples, one row per head.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from headlab.analyses.attention.maps import check_context
from headlab.analyses.detect import repeat_period
from headlab.batch import Batch
from headlab.errors import ConfigError
from headlab.hooks import intervene_at
from headlab.interventions import Plan, StatsSource
from headlab.models.attention import attention_patterns
from headlab.models.layout import Layout, describe
from headlab.parts import Context, Part

__all__ = [
    "KEY_RULES",
    "MassPart",
    "attention_mass",
    "attention_mass_scores",
    "key_mask",
    "query_mask",
    "require_keys",
]

#: accepted ``keys`` values of :func:`attention_mass`
KEY_RULES = ("auto", "answer", "wrong", "induction", "context", "previous", "words", "positions")


def query_mask(batch: Batch) -> torch.Tensor:
    """``[batch, pos]`` bool: the positions whose attention is measured (module docstring)."""
    n, seq = len(batch), batch.seq_len
    out = torch.zeros(n, seq, dtype=torch.bool)
    if batch.answer_pos is not None:
        out[torch.arange(n), batch.answer_pos.long().cpu()] = True
    elif batch.target_mask is not None and bool(batch.target_mask[:, 1:].any()):
        out[:, :-1] = batch.target_mask[:, 1:].bool().cpu()  # position t-1 predicts token t
    else:
        out[:, -1] = True
    return out


def _word_positions(ids: torch.Tensor, tokenizer: Any, words: Sequence[str]) -> torch.Tensor:
    """``[batch, pos]`` bool: every occurrence of each word's token sequence."""
    if tokenizer is None:
        raise ConfigError("keys='words' needs the tokenizer to find the words' tokens")
    out = torch.zeros_like(ids, dtype=torch.bool)
    for word in words:
        found = False
        for text in {word.strip(), " " + word.strip()}:
            seq = list(tokenizer(text, add_special_tokens=False)["input_ids"])
            m = len(seq)
            if not m or m > ids.shape[1]:
                continue
            win = ids.unfold(1, m, 1)  # [batch, pos - m + 1, m]
            hit = (win == torch.tensor(seq)).all(-1)  # [batch, pos - m + 1]
            for j in range(m):
                out[:, j : j + hit.shape[1]] |= hit
            found = found or bool(hit.any())
        if not found:
            raise ConfigError(f"the word {word!r} occurs in no prompt; check --tokens")
    return out


def _resolve_rule(batch: Batch) -> str:
    ids = batch.input_ids
    if batch.answer_pos is not None and batch.correct is not None:
        before = torch.arange(batch.seq_len)[None, :] < batch.answer_pos.cpu()[:, None]
        if bool(((ids == batch.correct.cpu()[:, None]) & before).any()):
            return "answer"
    if batch.answer_pos is None and repeat_period(ids) is not None:
        return "induction"
    return "context"


def key_mask(
    batch: Batch,
    keys: str = "auto",
    *,
    words: Sequence[str] | None = None,
    positions: Sequence[int] | None = None,
    tokenizer: Any | None = None,
) -> tuple[torch.Tensor, str]:
    """``([batch, q, k] bool, rule)``: the key set of every query position under ``keys`` (see
    the module docstring; ``auto`` is resolved and returned)."""
    if keys not in KEY_RULES:
        raise ConfigError(f"unknown key set {keys!r}; choose from {', '.join(KEY_RULES)}")
    if batch.input_ids is None:
        raise ConfigError("attention mass reads token positions; give a batch of input_ids")
    ids = batch.input_ids.cpu()  # [batch, pos]
    n, seq = ids.shape
    rule = _resolve_rule(batch) if keys == "auto" else keys
    q = torch.arange(seq)[:, None]  # [q, 1]
    k = torch.arange(seq)[None, :]  # [1, k]
    if rule in ("answer", "wrong"):
        token = batch.correct if rule == "answer" else batch.wrong
        if batch.answer_pos is None or token is None:
            raise ConfigError(
                f"keys={rule!r} needs a task batch with answer_pos and {rule} tokens "
                "(names, capitals); use keys='words' or 'context' for other batches"
            )
        at = ids == token.cpu()[:, None]  # [batch, k]
        return (at[:, None, :] & (k < q)[None]).expand(n, seq, seq).clone(), rule
    if rule == "induction":
        prev = torch.full_like(ids, -1)
        prev[:, 1:] = ids[:, :-1]  # token before each key
        return (prev[:, None, :] == ids[:, :, None]) & (k <= q)[None], rule
    if rule == "context":
        return ((k >= 1) & (k < q)).expand(n, seq, seq).clone(), rule
    if rule == "previous":
        return (k == q - 1).expand(n, seq, seq).clone(), rule
    if rule == "words":
        if not words:
            raise ConfigError("keys='words' needs a list of words, e.g. --tokens Mary,John")
        at = _word_positions(ids, tokenizer, words)  # [batch, k]
        return at[:, None, :] & (k <= q)[None], rule
    if not positions:
        raise ConfigError("keys='positions' needs positions, e.g. [3, -2]")
    at = torch.zeros(seq, dtype=torch.bool)
    for p in positions:
        if not -seq <= p < seq:
            raise ConfigError(f"key position {p} is outside sequences of length {seq}")
        at[p] = True
    return (at[None, :] & (k <= q)).expand(n, seq, seq).clone(), rule


def attention_mass(
    model: nn.Module,
    batch: Batch,
    *,
    keys: str = "auto",
    words: Sequence[str] | None = None,
    positions: Sequence[int] | None = None,
    tokenizer: Any | None = None,
    queries: torch.Tensor | None = None,
    plan: Plan | None = None,
    stats: StatsSource | None = None,
    batch_size: int = 8,
    layout: Layout | None = None,
) -> pd.DataFrame:
    """Per example and head, the attention mass from the query positions to their key set
    (module docstring): tidy ``example, layer, head, value, keys`` (NaN: no key to measure).

    ``queries`` (``[batch, pos]`` bool) overrides the default query positions."""
    layout = layout if layout is not None else describe(model)
    check_context(model, batch.seq_len, "the batch")
    pairs, rule = key_mask(batch, keys, words=words, positions=positions, tokenizer=tokenizer)
    qm = query_mask(batch) if queries is None else queries.bool().cpu()
    if qm.shape != pairs.shape[:2]:
        raise ConfigError(f"queries must be [batch, pos] = {tuple(pairs.shape[:2])}")
    pairs = pairs & qm[:, :, None]  # [batch, q, k]
    has = pairs.any(-1)  # [batch, q]: measured queries
    n_q = has.sum(-1).double()  # [batch]
    parts = []
    around = partial(intervene_at, model, plan, stats=stats)
    for start, attn in attention_patterns(model, batch, batch_size=batch_size, around=around):
        m = pairs[start : start + attn.shape[1]].double()  # [batch, q, k]
        per_q = torch.einsum("lbhqk,bqk->lbhq", attn.double(), m)  # [layer, batch, head, q]
        parts.append(per_q.sum(-1))  # [layer, batch, head]
    total = torch.cat(parts, dim=1)  # [layer, batch, head]
    value = (total / n_q[None, :, None]).permute(1, 0, 2)  # [batch, layer, head]
    value[n_q == 0] = float("nan")
    _, n_layers, n_heads = value.shape
    ex, ly, h = np.indices(value.shape).reshape(3, -1)  # flat [batch * layer * head] each
    out = pd.DataFrame(
        {"example": ex, "layer": ly, "head": h, "value": value.reshape(-1).numpy(), "keys": rule}
    )
    if n_layers != layout.n_layers or n_heads != layout.n_heads:
        raise ConfigError(
            f"the model reported {n_layers} x {n_heads} patterns but its layout has "
            f"{layout.n_layers} x {layout.n_heads} heads"
        )
    return out


def attention_mass_scores(
    model: nn.Module,
    batch: Batch,
    *,
    keys: str = "auto",
    words: Sequence[str] | None = None,
    positions: Sequence[int] | None = None,
    tokenizer: Any | None = None,
    batch_size: int = 8,
    layout: Layout | None = None,
) -> pd.DataFrame:
    """Raw attention-weight head score: ``layer, head, value, keys, n``.

    ``value`` is the attention mass from the query positions to their key set (see the module
    docstring), averaged over the queries of an example that have keys, then over the ``n``
    examples with any. With the default ``keys="auto"``: on a task batch whose answer occurs in
    the prompt (``names``) the mass from ``answer_pos`` onto the correct answer's tokens; on a
    repeated batch (``induction``) the mass from each scored position onto the token after the
    earlier occurrence of its own token; otherwise (a corpus, ``capitals``) the mean mass from each
    scored position onto earlier tokens other than the first (``1 .. q-1``), i.e. attention that
    reads context rather than parking on the first token or the query itself.
    """
    per = attention_mass(
        model, batch, keys=keys, words=words, positions=positions, tokenizer=tokenizer,
        batch_size=batch_size, layout=layout,
    )  # fmt: skip
    ok = require_keys(per).dropna(subset=["value"])
    agg = ok.groupby(["layer", "head"], sort=True)["value"].agg(["mean", "size"]).reset_index()
    return pd.DataFrame(
        {
            "layer": agg["layer"].astype("int64"),
            "head": agg["head"].astype("int64"),
            "value": agg["mean"].astype(float),
            "keys": per["keys"].iloc[0],
            "n": agg["size"].astype("int64"),
        }
    )


def require_keys(mass: pd.DataFrame) -> pd.DataFrame:
    """``mass`` (an :func:`attention_mass` table), refused if no example has a key to measure."""
    if mass["value"].isna().all():
        raise ConfigError(
            f"no example has a key to measure under keys={mass['keys'].iloc[0]!r}; choose another "
            "key set (e.g. 'context', or words that occur in the prompts; CLI: --keys, --tokens)"
        )
    return mass


@dataclass(frozen=True)
class MassPart(Part):
    """Per example and head, the attention mass on the key set ``keys`` (``words``: these words,
    read with the context's tokenizer): the plausibility part of ``headlab attention`` (key
    ``mass``), an :func:`attention_mass` table, refused by :func:`require_keys` when empty."""

    keys: str = "auto"
    words: tuple[str, ...] | None = None
    key: str = "mass"

    def run(self, ctx: Context, on_forward: Callable[[int], None] | None = None) -> pd.DataFrame:
        mass = attention_mass(
            ctx.model, ctx.batch, keys=self.keys, words=self.words, tokenizer=ctx.tokenizer,
            batch_size=ctx.batch_size, layout=ctx.layout,
        )  # fmt: skip
        return require_keys(mass)
