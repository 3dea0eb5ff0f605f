"""Head-type detectors: previous-token, duplicate-token and induction scores from attention.

Two conventions, both reported in one tidy table (``layer, head, metric, value, n`` plus the
options used):

- **TransformerLens ``detect_head``** (``metric`` = ``previous_token``, ``duplicate_token``,
  ``induction``). Each sequence gets a 0/1 lower-triangular detection pattern ``P`` built from its
  own tokens: previous-token ``P[t, t-1] = 1``; duplicate-token ``P[t, s] = 1`` where
  ``tok[s] == tok[t]`` and ``s < t``; induction is the duplicate pattern shifted one column right
  (``P[t, s+1]``), first column zeroed. ``measure="mul"`` (TL's default) scores
  ``sum(A * P) / sum(A)`` over the whole ``[pos, pos]`` pattern; with ``exclude_bos`` column 0 of
  ``A`` is zeroed before both sums, with ``exclude_current_token`` its diagonal. ``measure="abs"``
  scores ``1 - sum|A - P| / pos`` (TL rounds it to 3 decimals; we do not). Sequence scores are
  averaged over the batch. On ``[BOS] r r`` a perfect induction head scores ``T / (2T + 1)`` with
  ``exclude_bos=False`` (the first half's rows count in the denominator) and about 1 with
  ``exclude_bos=True`` if it parks on BOS in the first half; a perfect previous-token head scores
  ``(N - 1) / N``.
- **ARENA / Olsson diagonal scores** (``induction_diag``, ``previous_token_diag``), only on
  batches that end in a repeated segment of period ``T`` (found from the tokens): the mean of the
  attention diagonal at offset ``-(T - 1)`` (induction) or ``-1`` (previous token). A perfect
  induction head on ``[BOS] r r`` scores ``T / (T + 2)`` to ``(T + 1) / (T + 2)``; the usual
  detector threshold is 0.4.

Attention probabilities are Hugging Face's own (:func:`headlab.models.attention.attention_patterns`,
under eager attention); :func:`detect_heads` also scores them under an intervention plan, e.g. to
see an induction head fail once its previous-token head is ablated. :class:`DetectPart` is the
one part of ``headlab detect`` (key ``detect``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import pandas as pd
import torch
from torch import nn

from headlab.batch import Batch
from headlab.errors import ConfigError
from headlab.heads import Head
from headlab.heads import top_heads as _top_heads
from headlab.hooks import intervene_at
from headlab.interventions import Plan, StatsSource
from headlab.models.attention import attention_patterns, check_unpadded
from headlab.models.layout import Layout, describe
from headlab.parts import Context, Part

__all__ = [
    "DETECTORS",
    "DIAGONAL",
    "DetectPart",
    "detect_heads",
    "detection_pattern",
    "diagonal_score",
    "pattern_score",
    "repeat_period",
    "top_heads",
]

#: TransformerLens detection patterns (``metric`` values of :func:`detect_heads`)
DETECTORS = ("previous_token", "duplicate_token", "induction")
#: ARENA diagonal scores, computed on repeated batches only
DIAGONAL = ("induction_diag", "previous_token_diag")
COLUMNS = ["layer", "head", "metric", "value", "n", "measure", "exclude_bos", "exclude_current"]


def detection_pattern(kind: str, ids: torch.Tensor) -> torch.Tensor:
    """TransformerLens detection pattern(s) ``[..., pos, pos]`` (0/1 float) for token ids
    ``[..., pos]``; ``kind`` is one of :data:`DETECTORS`."""
    n = ids.shape[-1]
    if kind == "previous_token":
        return torch.diag(torch.ones(n - 1), -1).expand(*ids.shape[:-1], n, n).clone()
    dup = (ids[..., :, None] == ids[..., None, :]).float().tril(-1)  # [..., q, k]: s < t
    if kind == "duplicate_token":
        return dup
    if kind == "induction":
        out = torch.zeros_like(dup)
        out[..., :, 1:] = dup[..., :, :-1]  # P[t, s + 1] = dup[t, s]
        return out.tril()
    raise ConfigError(f"unknown detector {kind!r}; choose from {', '.join(DETECTORS)}")


def pattern_score(
    attn: torch.Tensor,
    pattern: torch.Tensor,
    *,
    measure: str = "mul",
    exclude_bos: bool = False,
    exclude_current_token: bool = False,
) -> torch.Tensor:
    """TransformerLens similarity of attention ``attn [..., pos, pos]`` to a detection pattern
    ``pattern`` (broadcast against ``attn``): one score per leading index."""
    a = attn.clone()
    if measure == "mul":
        if exclude_bos:
            a[..., :, 0] = 0
        if exclude_current_token:
            a.diagonal(dim1=-2, dim2=-1).zero_()
        return (a * pattern).sum((-2, -1)) / a.sum((-2, -1)).clamp_min(1e-30)
    if measure == "abs":
        diff = (a - pattern).abs()
        if exclude_bos:
            diff[..., :, 0] = 0
        if exclude_current_token:
            diff.diagonal(dim1=-2, dim2=-1).zero_()
        return 1 - diff.sum((-2, -1)) / a.shape[-1]
    raise ConfigError(f"measure must be 'mul' or 'abs' (TransformerLens), got {measure!r}")


def diagonal_score(attn: torch.Tensor, offset: int) -> torch.Tensor:
    """ARENA score: mean of ``attn [..., pos, pos]`` along the diagonal ``offset`` below the
    main one (``period - 1`` for induction on a repeat of period ``period``, 1 for previous-token);
    one score per leading index."""
    return attn.diagonal(-offset, dim1=-2, dim2=-1).mean(-1)


def repeat_period(ids: torch.Tensor, min_period: int = 2) -> int | None:
    """The largest ``T`` such that every row of ``ids [batch, pos]`` ends in two copies of the
    same ``T`` tokens (``[BOS] r r`` has ``T = |r|``), or ``None``."""
    n = ids.shape[-1]
    for t in range(n // 2, min_period - 1, -1):
        if torch.equal(ids[:, n - t :], ids[:, n - 2 * t : n - t]):
            return t
    return None


def detect_heads(
    model: nn.Module,
    batch: Batch,
    *,
    detectors: Sequence[str] = DETECTORS,
    measure: str = "mul",
    exclude_bos: bool = False,
    exclude_current_token: bool = False,
    diagonal: bool = True,
    plan: Plan | None = None,
    stats: StatsSource | None = None,
    batch_size: int = 8,
    layout: Layout | None = None,
) -> pd.DataFrame:
    """Score every head with each detector on ``batch``; a tidy table (see the module docstring).

    Args:
        detectors: any of :data:`DETECTORS`.
        measure: ``"mul"`` (TransformerLens default) or ``"abs"``.
        exclude_bos: zero attention to position 0 before scoring.
        exclude_current_token: zero attention to the query's own position before scoring.
        diagonal: also compute the ARENA diagonal scores when the batch is a repeat.
        plan, stats: score the patterns of the intervened model instead.
    """
    for d in detectors:
        if d not in DETECTORS:
            raise ConfigError(f"unknown detector {d!r}; choose from {', '.join(DETECTORS)}")
    if measure not in ("mul", "abs"):
        raise ConfigError(f"measure must be 'mul' or 'abs' (TransformerLens), got {measure!r}")
    check_unpadded(batch)
    layout = layout if layout is not None else describe(model)
    if batch.seq_len < 3:
        raise ConfigError(f"head detectors need sequences of 3+ tokens, got {batch.seq_len}")
    period = repeat_period(batch.input_ids) if diagonal else None
    names = list(detectors) + (list(DIAGONAL) if period else [])
    shape = (layout.n_layers, layout.n_heads)
    sums = {name: torch.zeros(shape, dtype=torch.float64) for name in names}
    around = partial(intervene_at, model, plan, stats=stats)
    for start, attn in attention_patterns(model, batch, batch_size=batch_size, around=around):
        ids = batch.input_ids[start : start + attn.shape[1]]  # [batch, pos]
        for d in detectors:
            pat = detection_pattern(d, ids)[None, :, None]  # [1, batch, 1, q, k]
            s = pattern_score(
                attn,
                pat,
                measure=measure,
                exclude_bos=exclude_bos,
                exclude_current_token=exclude_current_token,
            )  # [layer, batch, head]
            sums[d] += s.double().sum(1)
        if period:
            a = attn.double()  # [layer, batch, head, q, k]
            sums["induction_diag"] += diagonal_score(a, period - 1).sum(1)
            sums["previous_token_diag"] += diagonal_score(a, 1).sum(1)
    n = len(batch)
    rows = [
        {
            "layer": ly,
            "head": h,
            "metric": name,
            "value": float(sums[name][ly, h] / n),
            "n": n,
            "measure": measure if name in DETECTORS else "diagonal",
            "exclude_bos": bool(exclude_bos) if name in DETECTORS else False,
            "exclude_current": bool(exclude_current_token) if name in DETECTORS else False,
        }
        for name in names
        for ly in range(layout.n_layers)
        for h in range(layout.n_heads)
    ]
    return pd.DataFrame(rows, columns=COLUMNS)


def top_heads(table: pd.DataFrame, metric: str, k: int = 5) -> list[Head]:
    """The ``k`` highest-scoring heads of detector ``metric`` (:func:`headlab.heads.top_heads` on
    its rows; ties by layer, head)."""
    if not (table["metric"] == metric).any():
        raise ConfigError(f"no rows for metric {metric!r}; available: {sorted(set(table.metric))}")
    return _top_heads(table, "value", k, where=table["metric"] == metric)


@dataclass(frozen=True)
class DetectPart(Part):
    """Every head scored by each detector on the run's batch: the one part of ``headlab detect``
    (key ``detect``), a :func:`detect_heads` table."""

    detectors: tuple[str, ...] = DETECTORS
    measure: str = "mul"
    exclude_bos: bool = False
    exclude_current_token: bool = False
    key: str = "detect"

    def run(self, ctx: Context, on_forward: Callable[[int], None] | None = None) -> pd.DataFrame:
        return detect_heads(
            ctx.model, ctx.batch, detectors=self.detectors, measure=self.measure,
            exclude_bos=self.exclude_bos, exclude_current_token=self.exclude_current_token,
            batch_size=ctx.batch_size, layout=ctx.layout,
        )  # fmt: skip
