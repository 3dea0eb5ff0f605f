"""Rank statistics shared by every analysis that compares two rankings of heads: Spearman
correlation (one pair, or row-wise over bootstrap draws), top-k overlap, bootstrap resample counts
over examples, and Efron's bias-corrected percentile interval."""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist

import numpy as np
import pandas as pd

from headlab.errors import ConfigError

__all__ = ["bc_interval", "bootstrap_counts", "rank_correlation", "spearman", "topk_overlap"]


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties); NaN for fewer than 3 pairs or a
    constant input."""
    x, y = pd.Series(list(a), dtype=float).rank(), pd.Series(list(b), dtype=float).rank()
    if len(x) < 3 or x.std() == 0 or y.std() == 0:
        return math.nan
    return float(np.corrcoef(x.to_numpy(), y.to_numpy())[0, 1])


def rank_correlation(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Row-wise Spearman correlation of ``[draw, head]`` arrays (average ranks for ties; NaN for a
    constant row, a row with NaN, or fewer than 3 heads)."""
    x, y = np.atleast_2d(x), np.atleast_2d(y)
    rx = pd.DataFrame(x).rank(axis=1).to_numpy()
    ry = pd.DataFrame(y).rank(axis=1).to_numpy()
    rx = rx - rx.mean(1, keepdims=True)
    ry = ry - ry.mean(1, keepdims=True)
    den = np.sqrt((rx**2).sum(1) * (ry**2).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = (rx * ry).sum(1) / den
    bad = (den == 0) | np.isnan(x).any(1) | np.isnan(y).any(1) | (x.shape[1] < 3)
    return np.where(bad, math.nan, rho)


def topk_overlap(a: Sequence[float], b: Sequence[float], k: int) -> float:
    """``|top_k(a) & top_k(b)| / k``: the share of the ``k`` highest scores of ``a`` that are
    also among those of ``b`` (ties broken by position, earlier first)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if not 1 <= k <= len(a) or len(a) != len(b):
        raise ConfigError(f"top-k overlap needs 1 <= k <= {len(a)} heads and equal lengths; k={k}")
    top_a = set(np.argsort(-a, kind="stable")[:k].tolist())
    top_b = set(np.argsort(-b, kind="stable")[:k].tolist())
    return len(top_a & top_b) / k


def bootstrap_counts(n: int, n_boot: int, seed: int) -> np.ndarray:
    """``[draw, example]`` counts of ``n_boot`` resamples of ``n`` examples with replacement."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))  # [draw, n]
    counts = np.zeros((n_boot, n))
    np.add.at(counts, (np.arange(n_boot)[:, None], idx), 1.0)
    return counts


def bc_interval(boot: np.ndarray, point: float, ci: float) -> tuple[float, float]:
    """Efron's bias-corrected percentile interval of ``point`` from bootstrap values ``boot``:
    the quantiles ``Phi(2 z0 -+ z)`` with ``z0 = Phi^-1(share of boot below point)`` (ties count
    half). A plain percentile interval would inherit the resampling bias: duplicated examples add
    noise to both per-head means and pull every resampled rho toward 0."""
    boot = boot[np.isfinite(boot)]
    if not boot.size or not math.isfinite(point):
        return math.nan, math.nan
    below = (np.sum(boot < point) + 0.5 * np.sum(boot == point)) / boot.size
    below = min(max(below, 0.5 / boot.size), 1 - 0.5 / boot.size)
    normal = NormalDist()
    z0, z = normal.inv_cdf(below), normal.inv_cdf((1 + ci) / 2)
    q = [normal.cdf(2 * z0 - z), normal.cdf(2 * z0 + z)]
    lo, hi = np.quantile(boot, q)
    return float(lo), float(hi)
