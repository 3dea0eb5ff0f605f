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

Attention probabilities come from ``output_attentions=True`` with the model's attention
implementation switched to ``eager`` for the duration (:func:`eager_attention`; SDPA and flash
kernels do not return them) and restored afterwards. :func:`attention_patterns` also runs under
an intervention plan, e.g. to see an induction head fail once its previous-token head is ablated.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from torch import nn

from headlab.batch import Batch
from headlab.errors import ConfigError, HeadlabError
from headlab.hooks import intervene
from headlab.interventions import Plan, StatsSource, example_offset
from headlab.models.layout import Layout, call_model, describe

__all__ = [
    "DETECTORS",
    "attention_patterns",
    "detect_figure",
    "detect_heads",
    "detection_pattern",
    "diagonal_score",
    "eager_attention",
    "pattern_score",
    "repeat_period",
    "top_heads",
]

#: TransformerLens detection patterns (``metric`` values of :func:`detect_heads`)
DETECTORS = ("previous_token", "duplicate_token", "induction")
#: ARENA diagonal scores, computed on repeated batches only
DIAGONAL = ("induction_diag", "previous_token_diag")
COLUMNS = ["layer", "head", "metric", "value", "n", "measure", "exclude_bos", "exclude_current"]


@contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Switch ``model`` to eager attention (which returns probabilities) and restore it after.

    Uses ``model.set_attn_implementation`` (transformers >= 4.48); raises a clear error for models
    without it.
    """
    config = getattr(model, "config", None)
    old = getattr(config, "_attn_implementation", None)
    setter = getattr(model, "set_attn_implementation", None)
    if old == "eager":
        yield
        return
    if setter is None or old is None:
        raise HeadlabError(
            f"{type(model).__name__} cannot switch to eager attention (no "
            "set_attn_implementation); load it with attn_implementation='eager' to read patterns"
        )
    setter("eager")
    try:
        yield
    finally:
        setter(old)


def _forward_attentions(model: nn.Module, inputs: dict[str, torch.Tensor]) -> tuple:
    out = call_model(model, inputs, output_attentions=True)
    attn = getattr(out, "attentions", None)
    if not attn or any(a is None for a in attn):
        raise HeadlabError(
            f"{type(model).__name__} returned no attention probabilities with "
            "output_attentions=True; its attention implementation cannot report them"
        )
    return tuple(attn)


def attention_patterns(
    model: nn.Module,
    batch: Batch,
    *,
    plan: Plan | None = None,
    stats: StatsSource | None = None,
    batch_size: int = 8,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(start, A)`` per sub-batch: ``A`` is ``[layer, batch, head, q, k]`` (float32, CPU)
    for examples ``start : start + batch`` of ``batch``, under ``plan`` if given.

    The model runs with eager attention until the generator is exhausted or closed (use it in a
    ``for`` loop, or ``contextlib.closing``)."""
    _check_unpadded(batch)
    device = next(model.parameters()).device
    with torch.no_grad(), eager_attention(model):
        for i, chunk in enumerate(batch.chunks(batch_size)):
            with ExitStack() as stack:
                stack.enter_context(example_offset(i * batch_size))
                if plan is not None and len(plan):
                    stack.enter_context(intervene(model, plan, stats=stats))
                attn = _forward_attentions(model, chunk.to(device).model_inputs())
            yield i * batch_size, torch.stack([a.float().cpu() for a in attn])


def _check_unpadded(batch: Batch) -> None:
    if batch.input_ids is None:
        raise ConfigError("head detectors read token ids; give a text batch (input_ids)")
    am = batch.attention_mask
    if am is not None and not bool(am.bool().all()):
        raise ConfigError(
            "head detectors need unpadded sequences of one length; use blocks from "
            "headlab.make_blocks or a task batch"
        )


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
    _check_unpadded(batch)
    layout = layout if layout is not None else describe(model)
    if batch.seq_len < 3:
        raise ConfigError(f"head detectors need sequences of 3+ tokens, got {batch.seq_len}")
    period = repeat_period(batch.input_ids) if diagonal else None
    names = list(detectors) + (list(DIAGONAL) if period else [])
    shape = (layout.n_layers, layout.n_heads)
    sums = {name: torch.zeros(shape, dtype=torch.float64) for name in names}
    for start, attn in attention_patterns(
        model, batch, plan=plan, stats=stats, batch_size=batch_size
    ):
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


def top_heads(table: pd.DataFrame, metric: str, k: int = 5) -> list[tuple[int, int]]:
    """The ``k`` highest-scoring ``(layer, head)`` pairs for ``metric``."""
    sub = table[table["metric"] == metric]
    if sub.empty:
        raise ConfigError(f"no rows for metric {metric!r}; available: {sorted(set(table.metric))}")
    best = sub.sort_values("value", ascending=False, kind="stable").head(k)
    return [(int(r.layer), int(r.head)) for r in best.itertuples()]


def detect_figure(table: pd.DataFrame, *, threshold: float = 0.4) -> Figure:
    """One layer x head heatmap per detector (scores in [0, 1]); heads above ``threshold`` are
    outlined with their score."""
    metrics = [m for m in (*DETECTORS, *DIAGONAL) if m in set(table["metric"])]
    if not metrics:
        raise ConfigError("the table holds no detector rows")
    n_layers = int(table["layer"].max()) + 1
    n_heads = int(table["head"].max()) + 1
    fig = Figure(figsize=(0.9 + (0.35 * n_heads + 0.9) * len(metrics), 1.2 + 0.2 * n_layers))
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics, strict=True):
        sub = table[table["metric"] == metric]
        grid = np.full((n_layers, n_heads), np.nan)
        grid[sub["layer"].to_numpy(), sub["head"].to_numpy()] = sub["value"].to_numpy()
        im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
        for ly, h in zip(*np.nonzero(grid > threshold), strict=True):
            ax.text(h, ly, f"{grid[ly, h]:.2f}", ha="center", va="center", fontsize=6, color="k")
        ax.set_title(metric.replace("_", " "), fontsize=9)
        ax.set_xlabel("head")
        ax.set_xticks(range(n_heads))
        ax.set_yticks(range(0, n_layers, max(1, n_layers // 15)))
    axes[0].set_ylabel("layer")
    fig.colorbar(im, ax=list(axes), fraction=0.03, label="score")
    return fig
