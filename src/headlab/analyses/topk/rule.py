"""The statistics of the racing rule (``headlab sweep --top-k``): its options
(:class:`RaceRule`), the schedule of sample sizes, the interval width for a population mean from
a sample drawn without replacement (:func:`serfling_width`), the spread a head's range is
estimated from (:func:`spread`) and the ranking key's interval. See
:mod:`headlab.analyses.topk.race` for how they are used and ``docs/topk.md`` for the argument."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from headlab.errors import ConfigError

__all__ = [
    "DIRECTIONS",
    "KAPPA",
    "RaceRule",
    "key",
    "key_interval",
    "schedule",
    "serfling_width",
    "spread",
]

#: how heads are ranked: by |delta|, by the sweep's effect (ablating hurts), or by -effect
DIRECTIONS = ("abs", "hurts", "helps")

#: Bardenet & Maillard's constant of the empirical Bernstein-Serfling bound
KAPPA = 7.0 / 3.0 + 3.0 / math.sqrt(2.0)


@dataclass(frozen=True)
class RaceRule:
    """The options of the racing rule (see :mod:`headlab.analyses.topk.race`).

    Attributes:
        k: heads wanted per metric.
        confidence: probability that every decision is right (``0 < confidence < 1``).
        direction: ``abs``, ``hurts`` or ``helps`` (:data:`DIRECTIONS`).
        first: examples of round 0 (at least 2, fewer than the examples).
        growth: each later round multiplies the examples by this (at least 2).
        range_factor: the range of a head's ``N`` values is taken as at least this times its
            spread on its sample, range plus largest magnitude (at least 1; larger is safer and
            slower; the exact heads may raise it, see :meth:`Race._factor`).
        leaders: heads evaluated on every example right after round 0 (default ``2 k``).
        max_cost: stop when the next round would pass this fraction of the full sweep's
            evaluations (``None``: no limit; the result is then always decided or exact).
        seed: seed of the example order.
    """

    k: int
    confidence: float = 0.95
    direction: str = "abs"
    first: int = 4
    growth: int = 2
    range_factor: float = 1.0
    leaders: int | None = None
    max_cost: float | None = None
    seed: int = 0

    def check(self, n_heads: int | None = None, n_examples: int | None = None) -> RaceRule:
        """This rule, refused with a ConfigError naming the option and the fix if an option is
        invalid or (given the sizes) if it cannot run on ``n_heads`` heads and ``n_examples``
        examples."""
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ConfigError(f"--top-k must be a positive integer, got {self.k!r}")
        c = self.confidence
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 < c < 1:
            raise ConfigError(
                f"--confidence must be a number strictly between 0 and 1 (e.g. 0.95), got {c!r}"
            )
        if self.direction not in DIRECTIONS:
            raise ConfigError(
                f"--direction must be one of {', '.join(DIRECTIONS)}, got {self.direction!r}"
            )
        if isinstance(self.first, bool) or not isinstance(self.first, int) or self.first < 2:
            raise ConfigError(f"the first round needs at least 2 examples, got {self.first!r}")
        if isinstance(self.growth, bool) or not isinstance(self.growth, int) or self.growth < 2:
            raise ConfigError(f"growth must be an integer >= 2, got {self.growth!r}")
        if not self.range_factor >= 1 or not math.isfinite(self.range_factor):
            raise ConfigError(
                f"--range-factor must be a finite number >= 1, got {self.range_factor}"
            )
        if self.leaders is not None and (
            isinstance(self.leaders, bool) or not isinstance(self.leaders, int) or self.leaders < 0
        ):
            raise ConfigError(f"leaders must be an integer >= 0, got {self.leaders!r}")
        if self.max_cost is not None and not 0 < self.max_cost <= 1:
            raise ConfigError(
                f"--max-cost must be a fraction of the full sweep in (0, 1], got {self.max_cost}"
            )
        if n_heads is not None and self.k > n_heads:
            raise ConfigError(
                f"--top-k {self.k} asks for more heads than the {n_heads} being swept; give "
                f"--top-k {n_heads} or less (or drop --top-k for the full sweep)"
            )
        if n_examples is not None and n_examples <= self.first:
            raise ConfigError(
                f"too few examples to decide anything: the search evaluates every head on "
                f"{self.first} examples before any interval can decide, and there are only "
                f"{n_examples}, so it would be a full sweep with extra steps; give --n-blocks "
                f"{8 * self.first} or more, or drop --top-k"
            )
        return self

    @property
    def n_leaders(self) -> int:
        return 2 * self.k if self.leaders is None else self.leaders


def schedule(n_examples: int, first: int, growth: int) -> list[int]:
    """The sizes at which intervals are computed: ``first, first*growth, ...``, then
    ``n_examples`` (always last)."""
    sizes, n = [], first
    while n < n_examples:
        sizes.append(n)
        n *= growth
    return [*sizes, n_examples]


def serfling_width(
    n: np.ndarray, n_examples: int, sd: np.ndarray, span: np.ndarray, delta: float
) -> np.ndarray:
    """One-sided half-width of the interval for a population mean from a sample of ``n`` of its
    ``n_examples`` values drawn without replacement, holding with probability ``>= 1 - delta``.

    The tighter of (Bardenet & Maillard 2015) Hoeffding-Serfling,
    ``span * sqrt(rho_n log(2/delta) / (2 n))``, and empirical Bernstein-Serfling,
    ``sd * sqrt(2 rho_n log(10/delta) / n) + kappa span log(10/delta) / n``, each at ``delta/2``;
    ``rho_n = 1 - (n-1)/N`` for ``n <= N/2``, else ``(1 - n/N)(1 + 1/n)``; ``sd`` is the sample
    standard deviation with divisor ``n``, ``span`` the range of the population. Zero at ``n = N``.
    """
    n = np.asarray(n, dtype=float)
    big_n = float(n_examples)
    rho = np.where(n <= big_n / 2, 1 - (n - 1) / big_n, (1 - n / big_n) * (1 + 1 / n))
    rho = np.clip(rho, 0.0, 1.0)
    hoeffding = span * np.sqrt(rho * math.log(2 / delta) / (2 * n))
    log_eb = math.log(10 / delta)  # delta/2 for this bound, and its 5 delta' form
    bernstein = sd * np.sqrt(2 * rho * log_eb / n) + KAPPA * span * log_eb / n
    return np.where(n >= big_n, 0.0, np.minimum(hoeffding, bernstein))


def spread(values: np.ndarray) -> np.ndarray:
    """``[head, metric]`` range plus largest magnitude of ``values [head, example, metric]``: the
    scale a head's full range is estimated from (the range alone of a few examples can be
    near zero by chance; the largest magnitude keeps the estimate honest then)."""
    return values.max(1) - values.min(1) + np.abs(values).max(1)


def key_interval(
    lo: np.ndarray, hi: np.ndarray, signs: np.ndarray, direction: str
) -> tuple[np.ndarray, np.ndarray]:
    """Interval of the ranking key from that of the target; ``signs`` is -1 for metrics where
    higher is better (the sweep's ``effect = -delta``), else 1."""
    e_lo = np.where(signs > 0, lo, -hi)
    e_hi = np.where(signs > 0, hi, -lo)
    if direction == "hurts":
        return e_lo, e_hi
    if direction == "helps":
        return -e_hi, -e_lo
    k_hi = np.maximum(np.abs(lo), np.abs(hi))
    k_lo = np.where(lo > 0, lo, np.where(hi < 0, -hi, 0.0))
    return k_lo, k_hi


def key(mean: np.ndarray, signs: np.ndarray, direction: str) -> np.ndarray:
    return key_interval(mean, mean, signs, direction)[0] if direction != "abs" else np.abs(mean)
