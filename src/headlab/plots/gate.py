"""Figures of ``headlab gate``: gate maps, the head taxonomy and loss curves, each from a tidy
table (no pyplot; nothing is shown or saved here)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from headlab.plots.base import head_grid

__all__ = ["chg_figures", "contrast_figures", "gate_heatmap", "label_map", "loss_curves"]

LABEL_COLOURS = {
    "facilitating": "#1b9e77",
    "irrelevant": "#d9d9d9",
    "interfering": "#d95f02",
    "unstable": "#7570b3",
    "forget-specific": "#d95f02",
    "kept": "#d9d9d9",
}


def _axes(n_layers: int, n_heads: int) -> tuple[Figure, object]:
    fig = Figure(figsize=(1.6 + 0.45 * n_heads, 1.0 + 0.22 * n_layers))
    ax = fig.add_subplot()
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(n_heads))
    ax.set_yticks(range(0, n_layers, max(1, n_layers // 15)))
    return fig, ax


def gate_heatmap(table: pd.DataFrame, value: str, *, title: str | None = None) -> Figure:
    """Layer x head map of a gate value in [0, 1] (``g_plus``, ``g_minus``, ``g``, ``gate``)."""
    grid = head_grid(table, value)
    fig, ax = _axes(*grid.shape)
    im = ax.imshow(grid, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    ax.set_title(title or value, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.05).set_label(value)
    return fig


def label_map(table: pd.DataFrame, column: str = "label", *, title: str | None = None) -> Figure:
    """Layer x head map of categorical labels, with a legend and per-label counts."""
    names = [n for n in LABEL_COLOURS if n in set(table[column])]
    names += sorted(set(table[column]) - set(names))
    codes = table.assign(_code=table[column].map({n: i for i, n in enumerate(names)}))
    grid = head_grid(codes, "_code")
    colours = [LABEL_COLOURS.get(n, "#000000") for n in names]
    fig, ax = _axes(*grid.shape)
    ax.imshow(
        np.ma.masked_invalid(grid),
        cmap=ListedColormap(colours),
        vmin=-0.5,
        vmax=len(names) - 0.5,
        aspect="auto",
        interpolation="nearest",
    )
    counts = table[column].value_counts()
    handles = [
        Patch(color=c, label=f"{n} ({counts[n]})") for n, c in zip(names, colours, strict=True)
    ]
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(title or column, fontsize=9)
    return fig


def loss_curves(curves: pd.DataFrame, by: str, *, value: str = "loss") -> Figure:
    """Mean (over masks) of ``value`` against the update step, one line per ``by`` group, with
    the range over masks shaded."""
    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot()
    for key, g in curves.groupby(by, sort=False):
        stats = g.groupby("step")[value].agg(["mean", "min", "max"])
        ax.plot(stats.index, stats["mean"], label=f"{by} {key}")
        ax.fill_between(stats.index, stats["min"], stats["max"], alpha=0.2)
    ax.set_xlabel("update")
    ax.set_ylabel(value)
    ax.legend(fontsize=7)
    return fig


def chg_figures(table: pd.DataFrame, curves: pd.DataFrame) -> dict[str, Figure]:
    """The figures of a CHG run: ``G+`` and ``G-`` maps, the taxonomy and the loss curves."""
    return {
        "gate_plus.png": gate_heatmap(table, "g_plus", title="G+ (fit with +lam: keep)"),
        "gate_minus.png": gate_heatmap(table, "g_minus", title="G- (fit with -lam: remove)"),
        "labels.png": label_map(table, title="CHG head taxonomy"),
        "loss_curves.png": loss_curves(curves, "fit"),
    }


def contrast_figures(table: pd.DataFrame, curves: pd.DataFrame) -> dict[str, Figure]:
    """The figures of a contrastive CHG run: the gate map, the roles and the loss curves."""
    return {
        "gate_contrast.png": gate_heatmap(table, "g", title="contrastive gates (low: forget)"),
        "roles.png": label_map(table, "role", title="contrastive CHG roles"),
        "loss_curves.png": loss_curves(curves, "mask"),
    }
