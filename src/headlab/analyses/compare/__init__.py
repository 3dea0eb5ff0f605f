"""Rank agreement between head-importance measures on the same examples (METHODS.md section 6).

- :mod:`~headlab.analyses.compare.parts`: the measures by name (:func:`measures`) and as parts,
  each measured per example (:func:`compare_plan`).
- :mod:`~headlab.analyses.compare.stats`: scores, Spearman with bootstrap intervals over
  examples, top-k overlap, recall and depth of the reference's top-k, cost per measure.
- :mod:`~headlab.analyses.compare.comparison`: :func:`compare` (measure and summarise in one
  call), :func:`summarise` (per-example tables -> :class:`Comparison`).
"""

from headlab.analyses.compare.comparison import Comparison as Comparison
from headlab.analyses.compare.comparison import compare as compare
from headlab.analyses.compare.comparison import compare_parts as compare_parts
from headlab.analyses.compare.comparison import interval as interval
from headlab.analyses.compare.comparison import summarise as summarise
from headlab.analyses.compare.parts import CHEAP_MEASURES as CHEAP_MEASURES
from headlab.analyses.compare.parts import ComparePart as ComparePart
from headlab.analyses.compare.parts import attention_per_example as attention_per_example
from headlab.analyses.compare.parts import compare_plan as compare_plan
from headlab.analyses.compare.parts import measures as measures
from headlab.analyses.compare.parts import part_key as part_key
from headlab.analyses.compare.stats import PER_EXAMPLE_COLUMNS as PER_EXAMPLE_COLUMNS
from headlab.analyses.compare.stats import agreement as agreement
from headlab.analyses.compare.stats import measure_cost as measure_cost
from headlab.analyses.compare.stats import measure_scores as measure_scores
from headlab.analyses.compare.stats import pairwise_agreement as pairwise_agreement
from headlab.analyses.compare.stats import recall_depth as recall_depth

__all__ = [
    "CHEAP_MEASURES",
    "PER_EXAMPLE_COLUMNS",
    "ComparePart",
    "Comparison",
    "agreement",
    "attention_per_example",
    "compare",
    "compare_parts",
    "compare_plan",
    "interval",
    "measure_cost",
    "measure_scores",
    "measures",
    "pairwise_agreement",
    "part_key",
    "recall_depth",
    "summarise",
]
