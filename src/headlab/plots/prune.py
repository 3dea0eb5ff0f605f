"""Figures of ``headlab prune``: damage against the fraction pruned."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

__all__ = ["prune_figure"]


def prune_figure(summary: pd.DataFrame) -> Figure:
    """Delta of each metric against the fraction pruned, from the curves' summary
    (:func:`headlab.analyses.prune.summarize`): one panel per metric, one colour per method and
    one line style per order (one colour per order when there is a single method); random orders
    show mean ± sd over seeds."""
    s = summary
    metrics = list(dict.fromkeys(s["metric"]))
    methods = list(dict.fromkeys(s["method"]))
    orders = list(dict.fromkeys(s["order"]))
    styles = {"random": "-", "sweep": "--", "iterative": ":"}
    by_order = len(methods) == 1
    colours = {k: f"C{i}" for i, k in enumerate(orders if by_order else methods)}
    fig = Figure(figsize=(4.2 * len(metrics), 3.4))
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics, strict=True):
        for (order, method), g in s[s["metric"] == metric].groupby(["order", "method"], sort=False):
            g = g.sort_values("fraction")
            x, y = g["fraction"].to_numpy(), g["delta"].to_numpy()
            colour = colours[order if by_order else method]
            ax.plot(x, y, styles.get(order, "-."), color=colour, marker=".",
                    label=f"{method} ({order})")  # fmt: skip
            sd = g["delta_sd"].to_numpy()
            if order == "random" and np.isfinite(sd).any():
                ax.fill_between(x, y - sd, y + sd, color=colour, alpha=0.15, lw=0)
        base = s[s["metric"] == metric]["baseline"].iloc[0]
        unit = s["unit"].iloc[0]
        ax.axhline(0, color="0.6", lw=0.8)
        ax.set_xlabel(f"fraction of {unit}s ablated")
        ax.set_ylabel(f"Δ {metric}")
        ax.set_title(f"Δ{metric} (clean {base:.3g})", fontsize=9)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig
