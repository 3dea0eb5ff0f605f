"""Cheap importance estimates of every head, and their check against exact ablation.

- :mod:`~headlab.analyses.estimate.atp`: :func:`estimate` — attribution patching (``atp:*``),
  gradient importance and rollout in the sweep's tidy table; :func:`estimate_terms`, the
  per-example terms other analyses (``compare``) resample.
- :mod:`~headlab.analyses.estimate.rollout`: head-level attention rollout.
- :mod:`~headlab.analyses.estimate.check`: :func:`estimate_then_exact`, the estimate-vs-exact
  rank correlation on the top heads plus a random sample.
"""

from headlab.analyses.estimate.atp import ESTIMATE_METHODS as ESTIMATE_METHODS
from headlab.analyses.estimate.atp import EstimateTerms as EstimateTerms
from headlab.analyses.estimate.atp import check_methods as check_methods
from headlab.analyses.estimate.atp import estimate as estimate
from headlab.analyses.estimate.atp import estimate_terms as estimate_terms
from headlab.analyses.estimate.check import EstimateCheck as EstimateCheck
from headlab.analyses.estimate.check import estimate_then_exact as estimate_then_exact
from headlab.analyses.estimate.rollout import rollout_per_example as rollout_per_example
from headlab.analyses.estimate.rollout import rollout_scores as rollout_scores

__all__ = [
    "ESTIMATE_METHODS",
    "EstimateCheck",
    "EstimateTerms",
    "check_methods",
    "estimate",
    "estimate_terms",
    "estimate_then_exact",
    "rollout_per_example",
    "rollout_scores",
]
