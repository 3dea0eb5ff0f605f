"""Figures of ``headlab sweep``: one layer × head heatmap of Δ per (method, metric)."""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure

from headlab.plots.base import heatmaps

__all__ = ["sweep_figures"]


def sweep_figures(table: pd.DataFrame) -> dict[str, Figure]:
    """``{"heatmap_zero_ce.png": Figure, ...}`` for a sweep's tidy table."""
    return heatmaps(table)
