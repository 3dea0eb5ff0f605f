"""Figures of ``headlab estimate``: one layer × head heatmap per (method, metric) — the estimated
Δ for attribution patching and integrated gradients, the importance (``value``) for gradient and
rollout."""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure

from headlab.plots.base import heatmaps

__all__ = ["estimate_figures"]


def _value(method: str) -> str:
    return "delta" if method.startswith(("atp:", "ig:")) else "value"


def _title(method: str, metric: str) -> str:
    if _value(method) == "delta":
        return f"{method}: estimated Δ{metric}"
    return f"{method} ({metric})"


def estimate_figures(table: pd.DataFrame) -> dict[str, Figure]:
    """``{"heatmap_atp_zero_ce.png": Figure, ...}`` for an estimate table."""
    return heatmaps(table, value=_value, title=_title)
