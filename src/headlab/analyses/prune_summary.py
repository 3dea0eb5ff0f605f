"""Summaries of a pruning table (:mod:`headlab.analyses.prune`): the mean and spread over seeds
of each curve (:func:`summarize`) and the largest fraction that stays within a tolerance
(:func:`removable_fraction`)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from headlab.errors import ConfigError

__all__ = ["removable_fraction", "summarize"]


def summarize(table: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation over seeds of ``value``, ``delta`` and ``effect``, one row per
    ``(order, method, unit, fraction, metric)`` (``n_seeds`` curves each; sd is NaN for one)."""
    keys = ["order", "method", "unit", "fraction", "metric"]
    g = table.groupby(keys, sort=True)
    out = g.agg(
        n_pruned=("n_pruned", "first"),
        baseline=("baseline", "first"),
        value=("value", "mean"),
        delta=("delta", "mean"),
        delta_sd=("delta", "std"),
        effect=("effect", "mean"),
        n_seeds=("seed", "nunique"),
    )
    return out.reset_index()


def removable_fraction(
    table: pd.DataFrame, tolerance: float, *, metric: str | None = None, strict: bool = False
) -> pd.DataFrame:
    """The largest fraction that stays within ``tolerance`` per ``(order, method)``.

    A fraction counts when it and every smaller fraction keep the mean ``effect`` (harm, in the
    metric's units, e.g. nats of CE or accuracy points of top-1 as a fraction) at or below
    ``tolerance``. ``strict``: raise :class:`ConfigError` when, for every curve, no fraction above
    0 qualifies.
    """
    if not (isinstance(tolerance, (int, float)) and tolerance >= 0 and np.isfinite(tolerance)):
        raise ConfigError(f"tolerance must be a number >= 0 (metric units), got {tolerance!r}")
    s = summarize(table)
    metric = metric if metric is not None else str(table["metric"].iloc[0])
    s = s[s["metric"] == metric]
    if s.empty:
        raise ConfigError(f"no rows for metric {metric!r}; have {sorted(set(table['metric']))}")
    rows = []
    for (order, method), g in s.groupby(["order", "method"], sort=True):
        g = g.sort_values("fraction")
        ok = (g["effect"] <= tolerance).to_numpy().cumprod().astype(bool)
        best = g[ok]
        first_bad = g[~ok].head(1)
        rows.append(
            [order, method, metric, float(tolerance),
             float(best["fraction"].max()) if len(best) else np.nan,
             int(best["n_pruned"].max()) if len(best) else 0,
             float(first_bad["fraction"].iloc[0]) if len(first_bad) else np.nan,
             float(first_bad["effect"].iloc[0]) if len(first_bad) else np.nan]
        )  # fmt: skip
    cols = ["order", "method", "metric", "tolerance", "fraction", "n_pruned", "next_fraction",
            "next_effect"]  # fmt: skip
    out = pd.DataFrame(rows, columns=cols)
    if strict and not (out["fraction"].fillna(0) > 0).any():
        smallest = out["next_effect"].dropna()
        hint = (
            f" (the least harm at the first step is {smallest.min():.4g})" if len(smallest) else ""
        )
        raise ConfigError(
            f"no pruning fraction above 0 stays within tolerance {tolerance} {metric}{hint}; "
            "raise --tolerance or use finer --fractions"
        )
    return out
