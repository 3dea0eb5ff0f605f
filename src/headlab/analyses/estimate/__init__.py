"""Cheap importance estimates of every head, and their check against exact ablation.

- :mod:`~headlab.analyses.estimate.atp`: attribution patching (``atp:*``) and gradient
  importance as per-example terms, :func:`estimate_terms` (what ``compare`` resamples).
- :mod:`~headlab.analyses.estimate.tables`: :func:`estimate` — those terms and rollout in the
  sweep's tidy table; :func:`per_example_estimates`, the terms as a tidy per-example table
  (:func:`estimate_tables`: both at once).
- :mod:`~headlab.analyses.estimate.ig`: :func:`ig_terms`, layer-wise integrated gradients
  (``ig:METHOD[:STEPS]``), dispatched to by :func:`estimate_terms` and :func:`estimate`;
  :mod:`~headlab.analyses.estimate.cost`: what each estimate costs in forward passes.
- :mod:`~headlab.analyses.estimate.rollout`: head-level attention rollout.
- :mod:`~headlab.analyses.estimate.check`: :func:`estimate_then_exact`, the estimate-vs-exact
  rank correlation on the top heads plus a random sample.
"""

from headlab.analyses.estimate.atp import ESTIMATE_METHODS as ESTIMATE_METHODS
from headlab.analyses.estimate.atp import EstimateTerms as EstimateTerms
from headlab.analyses.estimate.atp import check_methods as check_methods
from headlab.analyses.estimate.atp import estimate_terms as estimate_terms
from headlab.analyses.estimate.check import EstimateCheck as EstimateCheck
from headlab.analyses.estimate.check import estimate_then_exact as estimate_then_exact
from headlab.analyses.estimate.ig import IGTerms as IGTerms
from headlab.analyses.estimate.ig import ig_terms as ig_terms
from headlab.analyses.estimate.rollout import rollout_per_example as rollout_per_example
from headlab.analyses.estimate.rollout import rollout_scores as rollout_scores
from headlab.analyses.estimate.tables import PER_EXAMPLE_COLUMNS as PER_EXAMPLE_COLUMNS
from headlab.analyses.estimate.tables import EstimateTables as EstimateTables
from headlab.analyses.estimate.tables import estimate as estimate
from headlab.analyses.estimate.tables import estimate_tables as estimate_tables
from headlab.analyses.estimate.tables import per_example_estimates as per_example_estimates

__all__ = [
    "ESTIMATE_METHODS",
    "PER_EXAMPLE_COLUMNS",
    "EstimateCheck",
    "EstimateTables",
    "EstimateTerms",
    "IGTerms",
    "check_methods",
    "estimate",
    "estimate_tables",
    "estimate_terms",
    "estimate_then_exact",
    "ig_terms",
    "per_example_estimates",
    "rollout_per_example",
    "rollout_scores",
]
