"""How statistics are collected: :class:`StatsConfig` (bins, histogram range, reservoir, and what
``peak`` reads from them)."""

from __future__ import annotations

from dataclasses import dataclass

from headlab.defaults import DEFAULT_BINS
from headlab.errors import ConfigError


@dataclass(frozen=True)
class StatsConfig:
    """How statistics are collected.

    Attributes:
        bins: histogram bins per neuron (peak and median resolution).
        range: ``"quantile"`` (``[q, 1-q]`` quantiles of the warm-up sample), ``"minmax"``
            (warm-up min/max) or ``"fixed"`` (``fixed_range`` for every neuron).
        quantile: ``q`` for the quantile range.
        fixed_range: ``(low, high)`` for ``range="fixed"``.
        warmup_tokens: tokens buffered per layer to fix the histogram range.
        reservoir: inputs kept for resample ablation (0: none), column by column as given;
            padding positions (``attention_mask == 0``) are stored as zeros.
        seed: seed of the reservoir sampling.
        skip_first: leave each input's first real token (often a BOS attention sink; column 0
            unless the batch is left-padded) out of mean/variance/histogram.
        peak_estimator: what a plain ``peak`` reads from these statistics: ``"kde"`` (a Gaussian
            kernel density of bandwidth ``DEFAULT_KDE_BANDWIDTH``, stable from ~25k values per
            neuron) or ``"hist"`` (the fullest bin, which needs far more; see
            ``docs/peak-convergence.md``). Files saved before this setting existed read ``"hist"``.
    """

    bins: int = DEFAULT_BINS
    range: str = "quantile"
    quantile: float = 0.001
    fixed_range: tuple[float, float] | None = None
    warmup_tokens: int = 4096
    reservoir: int = 16
    seed: int = 0
    skip_first: bool = False
    peak_estimator: str = "kde"

    def __post_init__(self) -> None:
        if self.bins < 2:
            raise ConfigError(f"StatsConfig.bins must be >= 2, got {self.bins}")
        if self.range not in ("quantile", "minmax", "fixed"):
            raise ConfigError(
                f"StatsConfig.range must be 'quantile', 'minmax' or 'fixed', got {self.range!r}"
            )
        if self.range == "fixed":
            fr = self.fixed_range
            if fr is None or len(fr) != 2 or not fr[0] < fr[1]:
                raise ConfigError("range='fixed' needs fixed_range=(low, high) with low < high")
        if not 0 <= self.quantile < 0.5:
            raise ConfigError(f"StatsConfig.quantile must be in [0, 0.5), got {self.quantile}")
        if self.peak_estimator not in ("hist", "kde"):
            raise ConfigError(
                f"StatsConfig.peak_estimator must be 'hist' or 'kde', got {self.peak_estimator!r}"
            )
        if self.warmup_tokens < 1 or self.reservoir < 0:
            raise ConfigError("warmup_tokens must be >= 1 and reservoir >= 0")
