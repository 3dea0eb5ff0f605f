"""Figures of ``headlab detect``: one layer × head heatmap of scores per detector."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from headlab.analyses.detect import DETECTORS, DIAGONAL
from headlab.errors import ConfigError
from headlab.plots.base import head_grid

__all__ = ["detect_figure"]


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
        grid = np.full((n_layers, n_heads), np.nan)  # [layer, head]
        sub = head_grid(table[table["metric"] == metric], "value")
        grid[: sub.shape[0], : sub.shape[1]] = sub
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
