"""Figures of ``headlab l0``: heads kept against the metric, and the loss curves (no pyplot;
nothing is shown or saved here)."""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure

from headlab.plots.gate import loss_curves

__all__ = ["l0_figures", "l0_tradeoff"]


def l0_tradeoff(table: pd.DataFrame) -> Figure:
    """Heads kept against the metric (deterministic gates and binary pruning, and the held-out
    split where the table has it), one point per penalty weight, with the clean model's value
    as a dotted line."""
    t = table.sort_values("n_kept")
    fig = Figure(figsize=(5.5, 3.5))
    ax = fig.add_subplot()
    ax.plot(t["n_kept"], t["value"], "o-", label="deterministic gates")
    ax.plot(t["n_kept"], t["value_binary"], "s--", alpha=0.7, label="kept heads on, rest zeroed")
    ax.axhline(float(t["baseline"].iloc[0]), color="grey", ls=":", label="all heads")
    if "value_heldout" in t:
        ax.plot(t["n_kept"], t["value_heldout"], "^-.", color="C2", label="held-out split")
        ax.axhline(
            float(t["baseline_heldout"].iloc[0]),
            color="C2",
            ls=":",
            alpha=0.6,
            label="all heads, held-out",
        )
    for r in t.itertuples():
        ax.annotate(
            f"λ={r.lam:g}",
            (r.n_kept, r.value),
            fontsize=7,
            xytext=(3, 3),
            textcoords="offset points",
        )
    ax.set_xlabel("heads kept")
    ax.set_ylabel(str(t["metric"].iloc[0]))
    ax.legend(fontsize=7)
    return fig


def l0_figures(table: pd.DataFrame, curves: pd.DataFrame) -> dict[str, Figure]:
    """The figures of an L0 run: the trade-off and the loss curves (one line per weight)."""
    return {"tradeoff.png": l0_tradeoff(table), "loss_curves.png": loss_curves(curves, "lam")}
