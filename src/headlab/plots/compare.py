"""Figures of ``headlab compare``: each measure's rank against the reference's, and each
measure's recall of the reference's top-k against its cost."""

from __future__ import annotations

import math

import pandas as pd
from matplotlib.figure import Figure

__all__ = ["compare_figure", "recall_cost_figure"]


def _label(row: pd.Series) -> str:
    rho = f"ρ = {row['spearman']:.2f}"
    if not math.isnan(row["ci_low"]):
        rho += f" [{row['ci_low']:.2f}, {row['ci_high']:.2f}]"
    hits = round(row["topk_overlap"] * row["k"])
    label = f"{row['measure']}\n{rho}, top-{row['k']} {hits}/{row['k']}"
    if "cost_fraction" in row and not math.isnan(row["cost_fraction"]):
        label += f", cost {row['cost_fraction']:.0%}"
    return label


def recall_cost_figure(agreement: pd.DataFrame) -> Figure:
    """Each measure's recall of the reference's top-k against its cost as a fraction of the
    exact single-head sweep's (log scale), one point per measure with a cost model; the dotted
    lines mark recall 0.8 and a third of the sweep's cost. Takes the ``agreement`` table."""
    known = agreement[agreement["cost_fraction"].notna()]
    if known.empty:
        raise ValueError("no measure in the agreement table has a cost: nothing to plot")
    fig = Figure(figsize=(4.2, 3.4))
    ax = fig.subplots()
    ax.scatter(known["cost_fraction"], known["recall"], s=14, color="tab:blue")
    for r in known.itertuples():
        ax.annotate(r.measure, (r.cost_fraction, r.recall), fontsize=6, xytext=(3, 2),
                    textcoords="offset points")  # fmt: skip
    ax.axhline(0.8, color="black", lw=0.6, ls=":")
    ax.axvline(1 / 3, color="black", lw=0.6, ls=":")
    ax.set_xscale("log")
    ax.set_ylim(-0.05, 1.05)
    k = int(agreement["k"].iloc[0])
    ax.set_title(f"recall of the {agreement['reference'].iloc[0]} top-{k} vs cost", fontsize=8)
    ax.set_xlabel("cost / exact sweep (forward-pass equivalents per example)", fontsize=8)
    ax.set_ylabel(f"recall@{k}", fontsize=8)
    ax.tick_params(labelsize=7)
    fig.tight_layout()
    return fig


def compare_figure(scores: pd.DataFrame, agreement: pd.DataFrame) -> Figure:
    """One scatter panel per measure of :func:`headlab.analyses.compare.compare`: its rank of
    every head (1 = most important) against the reference's, with Spearman ρ, its bootstrap
    interval, the top-k overlap and the cost (share of the exact sweep's) in the title. Takes the
    ``scores`` and ``agreement`` tables."""
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
