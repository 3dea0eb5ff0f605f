"""Streaming per-neuron activation statistics of the heads' outputs.

One pass over a dataset gives, for every layer and every neuron (coordinate of ``head * d_head``):
count, mean and variance (Chan/Welford merge in float64), min and max, a fixed-bin histogram from
which the **peak** (mode) and **median** are read, and a bounded reservoir of whole inputs for
resample ablation. Memory does not grow with the dataset: the histogram range is fixed from a
bounded warm-up sample (by default its [0.1 %, 99.9 %] quantiles), later values outside the range
go to under/overflow counters, and the reservoir keeps at most ``reservoir`` inputs (Algorithm R).

Statistics are saved as safetensors with a JSON header holding the layout, the model fingerprint
and the data fingerprint; using them on another model or layout raises
:class:`~headlab.errors.StatsMismatchError`. A peak or median read from too few values raises a
:class:`ThinStatisticsWarning` (or tells the job's ``on_status``) naming the fix.
"""

from headlab.stats.collect import StatsCollector as StatsCollector
from headlab.stats.collect import collect_stats as collect_stats
from headlab.stats.config import StatsConfig as StatsConfig
from headlab.stats.container import Stats as Stats
from headlab.stats.thin import ThinStatisticsWarning as ThinStatisticsWarning

__all__ = ["Stats", "StatsCollector", "StatsConfig", "ThinStatisticsWarning", "collect_stats"]
