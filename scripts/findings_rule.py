"""The one verdict rule of ``docs/findings.md`` (used by ``scripts/findings.py``).

Every claim is reduced to one number ``q`` and a threshold ``t`` with a side (the claim says
``q > t`` or ``q < t``). From the replicates a run holds we compute a 95 % interval for ``q``:

- replicates that are independent draws of ``q`` itself (random-order seeds; per-example paired
  differences): the Student-t interval of their mean (:func:`t_interval`);
- a statistic of many examples (a share, a slope, a rank correlation): the bias-corrected
  percentile bootstrap over examples (:func:`bootstrap_interval`, headlab's ``bc_interval``).

The claim **agrees** when the whole interval lies on the claim's side of ``t``, **disagrees** when
it lies wholly on the other side, and is **inconclusive** otherwise (:func:`verdict`). A claim made
of several conditions that must all hold combines them with :func:`combine`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from headlab.analyses.ranking import bc_interval, bootstrap_counts

__all__ = [
    "LEVEL",
    "RULE",
    "Claim",
    "bootstrap_interval",
    "combine",
    "mean_interval",
    "t_interval",
    "verdict",
    "vs_random_interval",
]

LEVEL = 0.95
N_BOOT = 2000
RULE = (
    "**Verdict rule.** Each claim is reduced to one number and a threshold on the claim's side "
    '(e.g. "ΔCE at 70 % of heads ≤ 0.1 nats"). We compute a 95 % interval for that number '
    "from the replicates the runs hold — a Student-t interval of the mean when the replicates "
    "are independent draws of the number itself (seeds of a random pruning order, per-example "
    "paired differences), a bias-corrected bootstrap over examples (2,000 resamples) when it is "
    "a statistic of many examples (a share, a slope, a rank correlation). The claim **agrees** "
    "when the whole interval lies on the claim's side of the threshold, **disagrees** when it "
    "lies wholly on the other side, and is **inconclusive** otherwise; a claim made of several "
    "conditions agrees only if all agree and disagrees if any disagrees. A point estimate "
    "without replicates decides nothing: such a claim is inconclusive by this rule."
)


def t_interval(values: Sequence[float], level: float = LEVEL) -> tuple[float, float, float]:
    """``(mean, low, high)``: the Student-t interval of the mean of independent replicates
    (NaN bounds for fewer than two)."""
    from scipy import stats

    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(x.mean())
    if x.size < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf((1 + level) / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return mean, mean - half, mean + half


def bootstrap_interval(
    statistic: Callable[[np.ndarray], float],
    n_examples: int,
    *,
    level: float = LEVEL,
    n_boot: int | None = None,
    seed: int = 0,
) -> tuple[float, float, float]:
    """``(point, low, high)`` of ``statistic(weights)`` over examples: ``weights`` ``[example]``
    is all ones for the point estimate and the resample counts of one bootstrap draw otherwise
    (so a weighted statistic equals the statistic of the resampled examples); ``n_boot``
    resamples (default :data:`N_BOOT`)."""
    point = float(statistic(np.ones(n_examples)))
    counts = bootstrap_counts(n_examples, n_boot or N_BOOT, seed)  # [draw, example]
    boot = np.array([statistic(c) for c in counts])
    low, high = bc_interval(boot, point, level)
    return point, low, high


def mean_interval(values: np.ndarray, weights: np.ndarray) -> tuple[float, float, float]:
    """``(point, low, high)`` of the ``weights``-weighted mean of per-example ``values``
    (:func:`bootstrap_interval` over the examples)."""
    v, w = np.asarray(values, dtype=float), np.asarray(weights, dtype=float)
    return bootstrap_interval(lambda c: float((c * w) @ v / (c * w).sum()), v.size)


def vs_random_interval(
    top: np.ndarray,
    random: np.ndarray,
    weights: np.ndarray,
    *,
    level: float = LEVEL,
    seed: int = 0,
) -> tuple[float, float, float]:
    """``(point, low, high)`` of the ``weights``-weighted mean over examples of ``top[example]``
    minus the mean of ``random[draw, example]`` over draws: how much more a chosen set does than
    random sets on the same examples. Each of the :data:`N_BOOT` bootstrap draws resamples the
    examples and the random sets together, so the interval also carries the random sets' spread."""
    top, random, w = (np.asarray(x, dtype=float) for x in (top, random, weights))
    if random.ndim != 2 or random.shape[1] != top.size or w.size != top.size:
        raise ValueError(f"random must be [draw, {top.size}] and weights [{top.size}]")
    point = float(w @ (top - random.mean(0)) / w.sum())
    counts = bootstrap_counts(top.size, N_BOOT, seed)  # [draw, example]
    rng = np.random.default_rng(seed + 1)  # independent of the examples' resampling
    picks = rng.integers(0, len(random), size=(N_BOOT, len(random)))
    boot = np.array([(c * w) @ (top - random[p].mean(0)) / (c * w).sum()
                     for c, p in zip(counts, picks, strict=True)])  # fmt: skip
    low, high = bc_interval(boot, point, level)
    return point, low, high


def verdict(low: float, high: float, threshold: float, side: str) -> str:
    """``agrees`` / ``disagrees`` / ``inconclusive`` for a claim ``q > threshold`` (``side=">"``)
    or ``q < threshold`` (``side="<"``) from the interval ``[low, high]`` of ``q``."""
    if side not in (">", "<"):
        raise ValueError(f"side must be '>' or '<', got {side!r}")
    if not (math.isfinite(low) and math.isfinite(high)):
        return "inconclusive"
    above, below = low > threshold, high < threshold
    if side == ">":
        return "agrees" if above else "disagrees" if below else "inconclusive"
    return "agrees" if below else "disagrees" if above else "inconclusive"


def combine(verdicts: Sequence[str]) -> str:
    """All conditions of one claim: disagrees if any disagrees, agrees if all agree."""
    if "disagrees" in verdicts:
        return "disagrees"
    return "agrees" if verdicts and all(v == "agrees" for v in verdicts) else "inconclusive"


class Claim:
    """One tested quantity: its interval, threshold and side, and the verdict they give."""

    def __init__(self, what: str, estimate: tuple[float, float, float], threshold: float,
                 side: str, *, digits: int = 2, replicates: str = "") -> None:  # fmt: skip
        self.what, self.threshold, self.side, self.digits = what, threshold, side, digits
        self.point, self.low, self.high = estimate
        self.replicates = replicates
        self.verdict = verdict(self.low, self.high, threshold, side)

    def interval(self) -> str:
        d = self.digits
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            return f"{_num(self.point, d)} (no interval)"
        return f"{_num(self.point, d)} [{_num(self.low, d)}, {_num(self.high, d)}]"


def _num(x: float, digits: int) -> str:
    return f"{x:.{digits}f}".replace("-", "−")
