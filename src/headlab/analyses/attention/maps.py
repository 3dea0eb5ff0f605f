"""Attention patterns of one prompt as a tidy table, and Abnar-Zuidema attention rollout.

``query`` is the position that attends, ``key`` the position attended to; a pattern is
``A[layer, head, query, key]`` (rows sum to 1), read from ``output_attentions=True`` under eager
attention (:func:`headlab.models.attention.attention_patterns`), so it is Hugging Face's own
number. Grouped-query models report one pattern per *query* head.

- :func:`attention_map`: every head's pattern as ``layer, head, query, key, query_token,
  key_token, weight``. On causal models the entries with ``key > query`` are all zero and left out.
- :func:`attention_rollout`: ``R_l = A~_l R_{l-1}``, ``R_0 = I``, ``A~_l = 0.5 mean_h A_{l,h} +
  0.5 I`` (Abnar & Zuidema 2020; METHODS.md section 6) after every layer, from an
  :func:`attention_map` table (no extra forward). The one home of the recurrence:
  :func:`mixed_attention` is ``A~_l`` (numpy or torch), :func:`rollout_matrices` the products.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from headlab.batch import Batch
from headlab.errors import ConfigError
from headlab.hooks import intervene_at
from headlab.interventions import Plan, StatsSource
from headlab.models.attention import attention_patterns
from headlab.models.layout import max_positions

__all__ = [
    "attention_map",
    "attention_rollout",
    "check_context",
    "map_tensor",
    "mixed_attention",
    "prompt_batch",
    "rollout_matrices",
    "token_labels",
]

MAP_COLUMNS = ["layer", "head", "query", "key", "query_token", "key_token", "weight"]
ROLLOUT_COLUMNS = ["layer", "query", "key", "query_token", "key_token", "weight"]


def check_context(model: nn.Module, n_tokens: int, what: str = "the prompt") -> None:
    """Raise :class:`ConfigError` if ``n_tokens`` exceed the model's context length."""
    limit = max_positions(model)
    if limit is not None and n_tokens > limit:
        raise ConfigError(
            f"{what} is {n_tokens} tokens but the model's context holds {limit} "
            f"(config max_position_embeddings); shorten it to at most {limit} tokens"
        )


def prompt_batch(
    tokenizer: Any, prompt: str, *, model: nn.Module | None = None, prepend_bos: bool | None = None
) -> Batch:
    """One prompt as a one-example :class:`Batch` (BOS as the tokenizer's own convention unless
    ``prepend_bos``), refused with a clear message if it exceeds ``model``'s context."""
    from headlab.data.blocks import bos_prefix

    if not isinstance(prompt, str) or not prompt.strip():
        raise ConfigError("the prompt is empty; give some text, e.g. --prompt 'The cat sat'")
    ids = bos_prefix(tokenizer, prepend_bos) + list(
        tokenizer(prompt, add_special_tokens=False, verbose=False)["input_ids"]
    )
    if model is not None:
        check_context(model, len(ids))
    return Batch(input_ids=torch.tensor([ids], dtype=torch.long))  # [1, pos]


def token_labels(tokenizer: Any | None, ids: Sequence[int]) -> list[str]:
    """A readable label per token (its decoded text, newlines escaped; ``<id>`` without a
    tokenizer or for tokens that decode to nothing)."""
    out = []
    for i in ids:
        text = tokenizer.decode([int(i)]) if tokenizer is not None else ""
        text = text.replace("\n", "\\n").replace("\t", "\\t")
        if not text:
            text = f"<{int(i)}>"
        elif not text.strip():
            text = text.replace(" ", "\u2423")  # a visible space
        out.append(text)
    return out


def _one_pattern(
    model: nn.Module, batch: Batch, plan: Plan | None, stats: StatsSource | None
) -> torch.Tensor:
    """``[layer, head, q, k]`` of a one-example batch."""
    around = partial(intervene_at, model, plan, stats=stats)
    [(_, attn)] = list(attention_patterns(model, batch, batch_size=1, around=around))
    return attn[:, 0]  # [layer, batch=1, head, q, k] -> [layer, head, q, k]


def attention_map(
    model: nn.Module,
    tokenizer: Any | None,
    prompt: str | Batch,
    *,
    example: int = 0,
    plan: Plan | None = None,
    stats: StatsSource | None = None,
    prepend_bos: bool | None = None,
) -> pd.DataFrame:
    """Every head's attention pattern for ``prompt`` (text, or example ``example`` of a Batch) as a
    tidy table ``layer, head, query, key, query_token, key_token, weight`` (under ``plan`` if
    given). ``tokenizer`` tokenizes text and labels tokens (``None``: a Batch, labelled by id)."""
    if isinstance(prompt, Batch):
        if not 0 <= example < len(prompt):
            raise ConfigError(f"example {example} is outside the batch of {len(prompt)}")
        batch = prompt.slice(example, example + 1)
        check_context(model, batch.seq_len, "the batch")
    else:
        if tokenizer is None:
            raise ConfigError("a text prompt needs the tokenizer: attention_map(model, tok, text)")
        batch = prompt_batch(tokenizer, prompt, model=model, prepend_bos=prepend_bos)
    attn = _one_pattern(model, batch, plan, stats).numpy()  # [layer, head, q, k]
    labels = token_labels(tokenizer, batch.input_ids[0].tolist())
    return _map_table(attn, labels)


def _map_table(attn: np.ndarray, labels: list[str]) -> pd.DataFrame:
    ly, h, q, k = np.indices(attn.shape).reshape(4, -1)  # flat [layer * head * q * k] each
    keep = np.ones(ly.shape, dtype=bool)
    if not np.triu(attn, 1).any():  # causal: the upper triangle is all zero
        keep = k <= q
    tok = np.asarray(labels, dtype=object)
    return pd.DataFrame(
        {
            "layer": ly[keep],
            "head": h[keep],
            "query": q[keep],
            "key": k[keep],
            "query_token": tok[q[keep]],
            "key_token": tok[k[keep]],
            "weight": attn.reshape(-1)[keep].astype(np.float64),
        },
        columns=MAP_COLUMNS,
    )


def map_tensor(table: pd.DataFrame) -> tuple[np.ndarray, list[str]]:
    """``([layer, head, q, k] weights, token labels)`` back from an :func:`attention_map`
    table (entries not in the table are 0)."""
    if table.empty:
        raise ConfigError("the attention table is empty")
    seq = int(max(table["query"].max(), table["key"].max())) + 1
    shape = (int(table["layer"].max()) + 1, int(table["head"].max()) + 1, seq, seq)
    out = np.zeros(shape)
    idx = tuple(table[c].to_numpy() for c in ("layer", "head", "query", "key"))
    out[idx] = table["weight"].to_numpy()
    labels = [""] * seq
    for pos, tok in zip(table["key"], table["key_token"], strict=True):
        labels[pos] = tok
    for pos, tok in zip(table["query"], table["query_token"], strict=True):
        labels[pos] = tok
    return out, labels


def attention_rollout(table: pd.DataFrame) -> pd.DataFrame:
    """Attention rollout after every layer from an :func:`attention_map` table (all heads of
    every layer): ``layer, query, key, query_token, key_token, weight`` with
    ``weight = R_layer[query, key]``, ``R_l = (0.5 mean_h A_{l,h} + 0.5 I) R_{l-1}``."""
    attn, labels = map_tensor(table)  # [layer, head, q, k]
    counts = table.groupby("layer")["head"].nunique()
    if len(counts) != attn.shape[0] or (counts != attn.shape[1]).any():
        raise ConfigError(
            "rollout averages every head of every layer; give the full attention_map table "
            "(not a subset of layers or heads)"
        )
    out = rollout_matrices(attn)[:, None]  # [layer, 1, q, k]
    flat = _map_table(out, labels).drop(columns="head")
    return flat[ROLLOUT_COLUMNS]


def mixed_attention(attn: Any) -> Any:
    """``A~ = 0.5 mean_h A_h + 0.5 I``: one layer's head-averaged attention mixed with the
    identity (the residual stream), the step of Abnar-Zuidema rollout. ``attn`` is ``[..., head,
    q, k]``, a float64 numpy array or torch tensor; the result ``[..., q, k]`` is of the same
    kind."""
    seq = attn.shape[-1]
    if isinstance(attn, torch.Tensor):
        eye = torch.eye(seq, dtype=attn.dtype, device=attn.device)
    else:
        eye = np.eye(seq)
    return 0.5 * attn.mean(-3) + 0.5 * eye


def rollout_matrices(attn: np.ndarray) -> np.ndarray:
    """``[layer, q, k]`` rollout after every layer, ``R_l = A~_l R_{l-1}`` with ``R_{-1} = I``
    (:func:`mixed_attention`), from ``[layer, head, q, k]`` float64 patterns."""
    r = np.eye(attn.shape[-1])
    rolled = []
    for a in attn:  # [head, q, k]
        r = mixed_attention(a) @ r  # [q, k]
        rolled.append(r)
    return np.stack(rolled)
