"""Figures of ``headlab compare``: each measure's rank against the reference's."""

from __future__ import annotations

import math

import pandas as pd
from matplotlib.figure import Figure

__all__ = ["compare_figure"]


def _label(row: pd.Series) -> str:
    rho = f"ρ = {row['spearman']:.2f}"
    if not math.isnan(row["ci_low"]):
        rho += f" [{row['ci_low']:.2f}, {row['ci_high']:.2f}]"
    hits = round(row["topk_overlap"] * row["k"])
    return f"{row['measure']}\n{rho}, top-{row['k']} {hits}/{row['k']}"


def compare_figure(scores: pd.DataFrame, agreement: pd.DataFrame) -> Figure:
    """One scatter panel per measure of :func:`headlab.analyses.compare.compare`: its rank of
    every head (1 = most important) against the reference's, with Spearman ρ, its bootstrap
    interval and the top-k overlap in the title. Takes the ``scores`` and ``agreement`` tables."""
    if agreement.empty:
        raise ValueError("the agreement table is empty: compare at least two measures")
    reference = agreement["reference"].iloc[0]
    ref = scores[scores["measure"] == reference].set_index(["layer", "head"])["rank"]
    n = len(agreement)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(3.3 * cols, 3.2 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, (_, row) in zip(axes.flat, agreement.iterrows(), strict=False):
        mine = scores[scores["measure"] == row["measure"]].set_index(["layer", "head"])["rank"]
        x, y = ref.to_numpy(), mine.reindex(ref.index).to_numpy()
        top = (x <= row["k"]) | (y <= row["k"])
        ax.scatter(x[~top], y[~top], s=6, alpha=0.5, color="tab:gray", linewidths=0)
        ax.scatter(x[top], y[top], s=10, color="tab:red", linewidths=0, label=f"top-{row['k']}")
        lim = max(len(x), 1) + 1
        ax.plot([1, lim], [1, lim], color="black", lw=0.6, ls=":")
        ax.set_xlim(0, lim)
        ax.set_ylim(0, lim)
        ax.set_title(_label(row), fontsize=8)
        ax.set_xlabel(f"{reference} rank", fontsize=8)
        ax.set_ylabel("rank", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.suptitle(
        f"head importance ranks vs {reference} "
        f"({int(agreement['n_heads'].iloc[0])} heads, {int(agreement['n_examples'].iloc[0])} "
        "examples)",
        fontsize=9,
    )
    fig.tight_layout()
    return fig
