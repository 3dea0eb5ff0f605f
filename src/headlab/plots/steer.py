"""Figure of ``headlab steer``: concept frequency and off-target cost against alpha."""

from __future__ import annotations

import math

import pandas as pd
from matplotlib.figure import Figure  # used without pyplot: no GUI backend, no global state

__all__ = ["steer_figure"]


def steer_figure(table: pd.DataFrame, summary: pd.DataFrame, *, title: str | None = None) -> Figure:
    """Concept frequency against alpha: the selected heads (line), random heads (mean ± sd band
    over seeds, and each seed faintly), the clean model (alpha = 1, dashed); and beside it the
    change of each off-target measure against alpha.

    Args:
        table: the steering table (:func:`headlab.analyses.steer.with_baseline`).
        summary: its per-alpha summary (:func:`headlab.analyses.steer.steer_summary`).
    """
    others = [c[2:-9] for c in summary.columns if c.startswith("d_") and c.endswith("_selected")]
    fig = Figure(figsize=(5.2 + 4.2 * bool(others), 3.8))
    axes = fig.subplots(1, 1 + bool(others), squeeze=False)[0]
    ax = axes[0]
    rate = table[(table["target"] == "concept") & (table["metric"] == "concept_rate")]
    a = summary["alpha"]
    for _, g in rate[rate["selection"] == "random"].groupby("seed"):
        ax.plot(g["alpha"], g["value"], color="grey", alpha=0.35, lw=0.8)
    lo = summary["random_mean"] - summary["random_sd"].fillna(0)
    hi = summary["random_mean"] + summary["random_sd"].fillna(0)
    ax.fill_between(a, lo, hi, color="grey", alpha=0.25, label="random heads (mean ± sd)")
    ax.plot(a, summary["random_mean"], color="grey", marker="s", ms=4)
    ax.plot(a, summary["selected_rate"], color="C3", marker="o", label="selected heads")
    clean = summary["clean_rate"].iloc[0] if len(summary) else math.nan
    ax.axhline(clean, color="k", ls="--", lw=1)
    ax.plot([1.0], [clean], "k*", ms=10, label="clean (alpha = 1)")
    ax.set_xlabel("alpha (head output scale)")
    ax.set_ylabel("concept words / generated words")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    if others:
        ax2 = axes[1]
        for i, name in enumerate(others):
            ax2.plot(
                a,
                summary[f"d_{name}_selected"],
                color=f"C{i}",
                marker="o",
                label=f"{name} (selected)",
            )
            ax2.plot(
                a,
                summary[f"d_{name}_random"],
                color=f"C{i}",
                marker="s",
                ls=":",
                label=f"{name} (random mean)",
            )
        ax2.axhline(0, color="k", lw=0.8)
        ax2.set_xlabel("alpha (head output scale)")
        ax2.set_ylabel("change vs clean")
        ax2.set_title("off-target cost", fontsize=10)
        ax2.legend(fontsize=7)
    fig.tight_layout()
    return fig
