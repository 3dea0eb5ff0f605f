"""Figures for ``headlab attention``: each takes a table and returns a matplotlib Figure.

- :func:`attention_grid_figure`: layer x head small multiples of an :func:`attention_map` table
  (a subset of layers/heads keeps 270 panels legible);
- :func:`attention_head_figure`: one head, token labels on both axes;
- :func:`rollout_figure`: the rollout matrix after one layer, token labels on both axes;
- :func:`faithfulness_figure`: attention mass vs |causal effect| per head, top heads labelled;
- :func:`prompt_figures`: the figures ``headlab attention --prompt`` writes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from headlab.analyses.attention.maps import map_tensor
from headlab.errors import ConfigError

__all__ = [
    "attention_grid_figure",
    "attention_head_figure",
    "faithfulness_figure",
    "prompt_figures",
    "rollout_figure",
]

MAX_LABELLED = 48  # longer prompts get every n-th token label only


def _ticks(ax, labels: Sequence[str], *, x: bool = True, y: bool = True, size: float = 7) -> None:
    step = max(1, -(-len(labels) // MAX_LABELLED))
    idx = list(range(0, len(labels), step))
    shown = [labels[i] for i in idx]
    if x:
        ax.set_xticks(idx, shown, rotation=90, fontsize=size)
    if y:
        ax.set_yticks(idx, shown, fontsize=size)


def _pick(table: pd.DataFrame, col: str, chosen: Sequence[int] | None) -> list[int]:
    have = sorted(int(v) for v in table[col].unique())
    if chosen is None:
        return have
    missing = [c for c in chosen if c not in have]
    if missing:
        raise ConfigError(f"{col}s {missing} are not in the table (it has {have[0]}..{have[-1]})")
    return list(chosen)


def attention_grid_figure(
    table: pd.DataFrame,
    *,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    panel: float = 1.1,
) -> Figure:
    """Small multiples of every chosen (layer, head) pattern: rows are layers, columns heads,
    colour is the weight in [0, 1]. Token labels go on the outer panels when the prompt has at
    most 32 tokens. ``panel``: inches per panel."""
    attn, labels = map_tensor(table)  # [layer, head, q, k]
    rows, cols = _pick(table, "layer", layers), _pick(table, "head", heads)
    labelled = len(labels) <= 32
    extra = 1.2 if labelled else 0.4
    size = (extra + panel * len(cols), extra + panel * len(rows) + 0.3)
    fig = Figure(figsize=size, layout="constrained")
    axes = fig.subplots(len(rows), len(cols), squeeze=False)
    im = None
    for i, ly in enumerate(rows):
        for j, h in enumerate(cols):
            ax = axes[i][j]
            im = ax.imshow(attn[ly, h], cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if labelled and i == len(rows) - 1:
                _ticks(ax, labels, y=False, size=4)
            if labelled and j == 0:
                _ticks(ax, labels, x=False, size=4)
            if i == 0:
                ax.set_title(f"H{h}", fontsize=8)
            if j == 0:
                ax.set_ylabel(f"L{ly}", fontsize=8, rotation=0, labelpad=12, va="center")
    fig.suptitle("attention patterns (rows: query, columns: key)", fontsize=9)
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=min(1.0, 6 / len(rows) + 0.1))
        fig.axes[-1].set_ylabel("weight")
    return fig


def _matrix_figure(mat: np.ndarray, labels: list[str], title: str) -> Figure:
    n = len(labels)
    side = min(12.0, 2.0 + 0.28 * n)
    fig = Figure(figsize=(side + 1.0, side))
    ax = fig.add_subplot()
    im = ax.imshow(mat, cmap="viridis", vmin=0, interpolation="nearest")
    _ticks(ax, labels)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    ax.set_title(title, fontsize=9)
    if n <= 16:
        for q in range(n):
            for k in range(n):
                if mat[q, k] < 0.005:
                    continue
                colour = "k" if mat[q, k] > 0.6 * mat.max() else "w"
                text = f"{mat[q, k]:.2f}"
                ax.text(k, q, text, ha="center", va="center", fontsize=5, color=colour)
    fig.colorbar(im, ax=ax, fraction=0.04, label="weight")
    return fig


def attention_head_figure(table: pd.DataFrame, layer: int, head: int) -> Figure:
    """One head's pattern with the prompt's tokens on both axes (values printed up to 16
    tokens)."""
    attn, labels = map_tensor(table)  # [layer, head, q, k]
    sub = table[(table["layer"] == layer) & (table["head"] == head)]
    if sub.empty:
        raise ConfigError(f"head {layer}.{head} is not in the attention table")
    return _matrix_figure(attn[layer, head], labels, f"attention of head L{layer}.H{head}")


def rollout_figure(table: pd.DataFrame, layer: int | None = None) -> Figure:
    """The rollout matrix ``R_layer`` of an :func:`attention_rollout` table (default: the last
    layer) with token labels on both axes."""
    if table.empty:
        raise ConfigError("the rollout table is empty")
    last = int(table["layer"].max())
    layer = last if layer is None else layer
    sub = table[table["layer"] == layer]
    if sub.empty:
        raise ConfigError(f"layer {layer} is not in the rollout table (0..{last})")
    mat, labels = map_tensor(sub.assign(layer=0, head=0))  # [1, 1, q, k]
    return _matrix_figure(mat[0, 0], labels, f"attention rollout after layer {layer}")


def faithfulness_figure(
    table: pd.DataFrame, summary: pd.DataFrame | None = None, *, label_top: int = 5
) -> Figure:
    """Scatter of every head's attention mass (x) against its |causal effect| (y); the
    ``label_top`` heads of either ranking are labelled ``L.H``; the title gives Spearman rho with
    its CI and the top-k overlap when ``summary`` is given."""
    if table.empty:
        raise ConfigError("the plausibility/faithfulness table is empty")
    fig = Figure(figsize=(6.0, 4.6))
    ax = fig.add_subplot()
    hurts = table["effect"] >= 0
    groups = ((hurts, "tab:blue", "removing it hurts"), (~hurts, "tab:orange", "removing it helps"))
    for mask, colour, label in groups:
        x, y = table.loc[mask, "plausibility"], table.loc[mask, "abs_effect"]
        ax.scatter(x, y, s=12, alpha=0.6, color=colour, label=label)
    top = table[
        (table["plausibility_rank"] <= label_top) | (table["faithfulness_rank"] <= label_top)
    ]
    for r in top.itertuples():
        ax.annotate(
            f"{r.layer}.{r.head}", (r.plausibility, r.abs_effect), fontsize=7,
            xytext=(3, 3), textcoords="offset points",
        )  # fmt: skip
        ax.scatter([r.plausibility], [r.abs_effect], s=30, facecolors="none", edgecolors="k")
    big = float(table["abs_effect"].max())
    if big > 0 and big > 100 * float(table["abs_effect"].median()):
        ax.set_yscale("symlog", linthresh=max(big * 1e-3, 1e-12))  # effects span decades
    keys, method, metric = (str(table[c].iloc[0]) for c in ("keys", "method", "metric"))
    ax.set_xlabel(f"attention mass on '{keys}' tokens (plausibility)")
    ax.set_ylabel(f"|effect| of {method} on {metric} (faithfulness)")
    ax.legend(fontsize=7, loc="upper right")
    if summary is not None and not summary.empty:
        s = summary.iloc[0]
        ax.set_title(
            f"Spearman ρ = {s.spearman:.2f} [{s.ci_low:.2f}, {s.ci_high:.2f}] "
            f"({s.ci:.0%} CI, {s.n_examples} examples); top-{s.top_k} overlap "
            f"{s.top_k_overlap} (chance {s.chance_overlap:.1f})",
            fontsize=8,
        )
    return fig


def prompt_figures(
    table: pd.DataFrame,
    rollout: pd.DataFrame,
    *,
    layers: Sequence[int] | None = None,
    heads: Sequence[tuple[int, int]] = (),
) -> dict[str, Figure]:
    """The figures of a prompt's patterns: ``attention_grid.png`` (the chosen ``layers``),
    ``rollout.png`` and one ``head_L{layer}_H{head}.png`` per head of ``heads``."""
    n_layers = int(table["layer"].max()) + 1
    panel = 1.1 if len(layers or range(n_layers)) <= 12 else 0.8
    out = {"attention_grid.png": attention_grid_figure(table, layers=layers, panel=panel)}
    for ly, h in heads:
        out[f"head_L{ly}_H{h}.png"] = attention_head_figure(table, ly, h)
    out["rollout.png"] = rollout_figure(rollout)
    return out
