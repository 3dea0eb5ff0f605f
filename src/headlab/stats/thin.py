"""Whether statistics hold enough values for the peak or median read from them.

The rule, from the peak convergence study (``scripts/peak_convergence.py``,
``docs/peak-convergence.md``; 1,200 neurons of the default model, 0.26k to 100k tokens): statistics
of ``n`` values per neuron are *too thin* for an estimator when doubling them would move the
estimate of one neuron in ten (the 90th percentile) by more than 0.1 of its standard deviation.
Measured, that is:

- ``peak:hist`` (fullest bin): fewer than 50,000 values (25,000 with at most 200 bins) — the
  argmax of a fine histogram keeps jumping between near-equal bins, and a coarse one moves a whole
  bin (0.1 sd at 100 bins) when it moves;
- ``peak:kde`` of bandwidth ``bw`` (fraction of the sd): fewer than ``100 / bw**1.5`` values
  (3,163 at the default 0.1; a fit to bandwidths 0.02–0.2);
- ``median``: fewer than 3,000 values.

:func:`thin_message` says so and names the fix; :class:`~headlab.stats.Stats` reports it once per
statistics object and estimator (to a job's ``on_status``, else as a
:class:`ThinStatisticsWarning`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from headlab.defaults import DEFAULT_KDE_BANDWIDTH

if TYPE_CHECKING:
    from headlab.stats.container import Stats

__all__ = [
    "HIST_MIN_VALUES",
    "KDE_CONSTANT",
    "MAX_SUGGESTED_BANDWIDTH",
    "MEDIAN_MIN_VALUES",
    "ThinStatisticsWarning",
    "hist_values_needed",
    "kde_values_needed",
    "per_occupied_bin",
    "thin_message",
]

#: ``peak:hist``: the fewest values per neuron with more than 200 bins (25,000 with fewer)
HIST_MIN_VALUES = 50_000
#: ``peak:kde``: a bandwidth ``bw`` needs ``KDE_CONSTANT / bw**1.5`` values per neuron
KDE_CONSTANT = 100.0
#: ``median``: the fewest values per neuron
MEDIAN_MIN_VALUES = 3_000
#: the widest kernel the warning proposes: 0.2 sd keeps ~80 % of the peak's distance from the mean
MAX_SUGGESTED_BANDWIDTH = 0.2


class ThinStatisticsWarning(UserWarning):
    """A peak or median was read from statistics too thin to locate it; the message names the
    fix (more statistics blocks, the KDE peak, or a wider KDE bandwidth)."""


def kde_values_needed(bandwidth: float) -> int:
    """Values per neuron a KDE peak of ``bandwidth`` (fraction of the neuron's sd) needs."""
    return math.ceil(KDE_CONSTANT / bandwidth**1.5)


def hist_values_needed(bins: int) -> int:
    """Values per neuron the fullest-bin peak of a ``bins``-bin histogram needs."""
    return HIST_MIN_VALUES if bins > 200 else HIST_MIN_VALUES // 2


def per_occupied_bin(hist: torch.Tensor) -> float:
    """Median over neurons of values per occupied bin of ``hist`` ``[..., bins]``."""
    h = hist.double().reshape(-1, hist.shape[-1])  # [neuron, bins]
    return float((h.sum(-1) / (h > 0).sum(-1).clamp_min(1)).median())


def thin_message(
    stats: Stats, kind: str, estimator: str = "kde", bandwidth: float = DEFAULT_KDE_BANDWIDTH
) -> str | None:
    """Why ``stats`` cannot support ``kind`` (``"peak"`` with ``estimator`` ``"hist"`` or
    ``"kde"``, or ``"median"``), naming the fix; ``None`` when they can."""
    n = int(stats.tensors["count"].double().median())  # values per neuron (= tokens)
    per_input = n / stats.n_inputs if stats.n_inputs else 0.0

    def more(values: int) -> str:
        if per_input <= 0:
            return f"collect more statistics (about {values:,} values per neuron)"
        blocks = math.ceil(values / per_input)
        return f"collect more statistics (--n-stats-blocks {blocks}: {values:,} tokens)"

    if kind == "median":
        if n >= MEDIAN_MIN_VALUES:
            return None
        return (
            f"median ablation from {n:,} values per neuron is noisy (it needs about "
            f"{MEDIAN_MIN_VALUES:,}); {more(MEDIAN_MIN_VALUES)}"
        )
    if estimator == "kde":
        need = kde_values_needed(bandwidth)
        if n >= need:
            return None
        fix = more(need)
        wider = math.ceil((KDE_CONSTANT / max(n, 1)) ** (2 / 3) * 20) / 20  # up, to 0.05
        if bandwidth < wider <= MAX_SUGGESTED_BANDWIDTH:
            fix += f" or use a wider kernel (peak:kde:{wider:g})"
        return (
            f"peak ablation (KDE, bandwidth {bandwidth:g} sd) from {n:,} values per neuron is "
            f"noisy (it needs about {need:,}); {fix}"
        )
    bins = stats.tensors["hist"].shape[-1]
    need = hist_values_needed(bins)
    if n >= need:
        return None
    load = per_occupied_bin(stats.tensors["hist"])
    return (
        f"peak:hist ablation from {n:,} values per neuron over {bins} bins ({load:.1f} per "
        f"occupied bin) is mostly noise (it needs about {need:,}); {more(need)} or use the KDE "
        f"peak (peak, which needs {kde_values_needed(DEFAULT_KDE_BANDWIDTH):,})"
    )
