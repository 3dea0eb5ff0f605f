"""Figures of ``headlab cascade``: each head's effect round after round."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
from matplotlib.figure import Figure

__all__ = ["cascade_figure"]


def cascade_figure(
    table: pd.DataFrame,
    backups: pd.DataFrame,
    removed: Sequence[tuple[int, int]],
    *,
    top: int = 8,
) -> Figure:
    """Effect of the ``top`` heads (by their largest effect) at every round of a cascade's
    ``table``; x ticks name the head removed before each round (``removed``, in order: see
    :func:`headlab.analyses.cascade.removed_heads`); the heads of ``backups``
    (:func:`headlab.analyses.cascade.backup_heads`) are circled and always drawn."""
    steps = sorted(set(table["step"]))
    peak = table.groupby(["layer", "head"])["effect"].max().sort_values(ascending=False)
    fig = Figure(figsize=(1.6 + 0.9 * len(steps), 3.6))
    ax = fig.add_subplot()
    flagged = zip(backups["layer"].astype(int), backups["head"].astype(int), strict=True)
    shown = list(dict.fromkeys([*peak.index[:top], *flagged]))
    for i, (ly, h) in enumerate(shown):
        g = table[(table["layer"] == ly) & (table["head"] == h)].sort_values("step")
        ax.plot(g["step"], g["effect"], marker="o", ms=3, color=f"C{i % 10}", label=f"L{ly}.H{h}")
        hits = backups[(backups["layer"] == ly) & (backups["head"] == h)]
        ax.scatter(hits["step"], hits["effect_after"], s=120, facecolors="none", edgecolors="k")
    labels = ["none"] + [f"-L{ly}.H{h}" for ly, h in removed[: len(steps) - 1]]
    ax.set_xticks(steps, [f"{s}\n{lab}" for s, lab in zip(steps, labels, strict=False)], fontsize=7)
    ax.axhline(0, color="0.6", lw=0.8)
    method, metric = table["method"].iloc[0], table["metric"].iloc[0]
    ax.set_xlabel("round (head removed before it)")
    ax.set_ylabel(f"effect on {metric} ({method} ablation)")
    ax.set_title("Iterative removal with re-ranking (circles: backup heads)", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig
