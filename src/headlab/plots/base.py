"""Figures: each takes a tidy table and returns a matplotlib Figure (nothing is shown or saved)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure  # used without pyplot: no GUI backend, no global state

__all__ = ["head_grid", "heatmap", "heatmaps"]


def head_grid(table: pd.DataFrame, value: str = "delta") -> np.ndarray:
    """``[layer, head]`` array of ``value`` (NaN where a head was not measured)."""
    n_layers = int(table["layer"].max()) + 1
    n_heads = int(table["head"].max()) + 1
    grid = np.full((n_layers, n_heads), np.nan)
    grid[table["layer"].to_numpy(), table["head"].to_numpy()] = table[value].to_numpy()
    return grid


def heatmap(
    table: pd.DataFrame,
    *,
    method: str,
    metric: str,
    value: str = "delta",
    title: str | None = None,
) -> Figure:
    """Layer x head heatmap of one method and metric, diverging colours centred at zero."""
    sub = table[(table["method"] == method) & (table["metric"] == metric)]
    if sub.empty:
        raise ValueError(f"no rows for method {method!r} and metric {metric!r}")
    grid = head_grid(sub, value)
    lim = float(np.nanmax(np.abs(grid))) if np.isfinite(grid).any() else 1.0
    lim = lim if lim > 0 else 1.0
    n_layers, n_heads = grid.shape
    fig = Figure(figsize=(1.2 + 0.45 * n_heads, 1.0 + 0.22 * n_layers))
    ax = fig.add_subplot()
    im = ax.imshow(
        grid,
        cmap="RdBu_r",
        norm=TwoSlopeNorm(0.0, -lim, lim),
        aspect="auto",
        interpolation="nearest",
    )
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(n_heads))
    step = max(1, n_layers // 15)
    ax.set_yticks(range(0, n_layers, step))
    base = sub["baseline"].iloc[0]
    ax.set_title(title or f"{method} ablation: Δ{metric} (baseline {base:.3g})", fontsize=9)
    cb = fig.colorbar(im, ax=ax, fraction=0.05)
    cb.set_label(f"Δ {metric}")
    return fig


def heatmaps(
    table: pd.DataFrame,
    *,
    value: Callable[[str], str] = lambda method: "delta",
    title: Callable[[str, str], str | None] = lambda method, metric: None,
) -> dict[str, Figure]:
    """``{"heatmap_METHOD_METRIC.png": Figure}``: one :func:`heatmap` per (method, metric) of
    ``table``; ``value(method)`` names the column shown, ``title(method, metric)`` the title."""
    out = {}
    for (method, metric), _ in table.groupby(["method", "metric"], sort=True):
        name = f"heatmap_{method.replace(':', '_')}_{metric}.png"
        out[name] = heatmap(
            table, method=method, metric=metric, value=value(method), title=title(method, metric)
        )
    return out
