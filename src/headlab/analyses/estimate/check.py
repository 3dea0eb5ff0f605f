"""Adaptive mode of the estimates: estimate every head cheaply, ablate the top ones and a random
sample exactly (through the engine), and report the estimate-vs-exact rank correlation."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
from torch import nn

from headlab.analyses.estimate.atp import counterfactual_patch
from headlab.analyses.estimate.tables import estimate
from headlab.analyses.ranking import spearman
from headlab.analyses.sweep import sweep, tidy
from headlab.batch import Batch
from headlab.errors import ConfigError
from headlab.interventions import Intervention, Patch, StatsSource, intervention_from_name
from headlab.metrics import Metric, get_metric
from headlab.models.layout import Layout, describe

__all__ = ["EstimateCheck", "estimate_then_exact"]


@dataclass(frozen=True, eq=False)
class EstimateCheck:
    """Estimates for every head, exact ablation of some, and how well the two agree.

    Attributes:
        estimates: the estimate table (every head).
        exact: the sweep table of the checked heads (top ``exact_top`` by estimate plus a random
            sample).
        correlation: one row per (method, metric): ``spearman`` (|estimate effect| against
            |exact effect| over every checked head), ``spearman_random`` (over the random sample
            only: the unbiased one, since the top heads are chosen by the estimate),
            ``spearman_signed`` (signed effects, attribution patching only), ``n_checked``,
            ``n_random``, ``exact_method`` and ``exact_metric``.
    """

    estimates: pd.DataFrame
    exact: pd.DataFrame
    correlation: pd.DataFrame

    @property
    def table(self) -> pd.DataFrame:
        """Estimates and exact rows in one tidy table."""
        return tidy(pd.concat([self.estimates, self.exact], ignore_index=True))


def _exact_for(method: str, patch: Patch | None) -> Intervention:
    """The exact ablation an estimate predicts (gradient and rollout: zero ablation)."""
    if method in ("gradient", "rollout"):
        return intervention_from_name("zero")
    rest = method.partition(":")[2]
    if rest == "patch":
        assert patch is not None
        return patch
    return intervention_from_name(rest)


def estimate_then_exact(
    model: nn.Module,
    batch: Batch,
    *,
    method: str = "atp:zero",
    metric: str | Metric = "ce",
    exact_top: int = 10,
    n_random: int = 10,
    seed: int = 0,
    stats: StatsSource | None = None,
    counterfactual: Batch | None = None,
    batch_size: int = 8,
    layout: Layout | None = None,
    estimates: pd.DataFrame | None = None,
    exact_sweep: Callable[[Intervention, Metric, list[tuple[int, int]]], pd.DataFrame]
    | None = None,
) -> EstimateCheck:
    """Estimate every head cheaply, ablate the ``exact_top`` heads with the largest |estimated
    effect| plus ``n_random`` others drawn with ``seed`` exactly (through the engine), and
    report the rank correlation between estimate and exact effect.

    ``estimates`` reuses a table from :func:`estimate` (same batch) instead of recomputing it.
    ``exact_sweep(intervention, metric, heads)`` runs the exact ablations instead of
    :func:`headlab.sweep` (a job runs them as sweep parts, resumable and on any executor).
    """
    layout = layout if layout is not None else describe(model)
    m = get_metric(metric)
    if exact_top < 0 or n_random < 0 or exact_top + n_random == 0:
        raise ConfigError("exact_top and n_random must be >= 0 and not both 0")
    est_metric = m.name if method != "rollout" else "attention"
    if estimates is None:
        estimates = estimate(
            model,
            batch,
            methods=[method],
            metrics=[m] if method != "rollout" else ["ce"],
            stats=stats,
            counterfactual=counterfactual,
            batch_size=batch_size,
            layout=layout,
        )
    pick_rows = (estimates["method"] == method) & (estimates["metric"] == est_metric)
    est = estimates[pick_rows].reset_index(drop=True)
    if est.empty:
        raise ConfigError(f"the estimates table has no rows for {method} / {est_metric}")
    order = est["effect"].abs().sort_values(ascending=False, kind="stable").index
    top = [(int(est.at[i, "layer"]), int(est.at[i, "head"])) for i in order[:exact_top]]
    rest = [(int(est.at[i, "layer"]), int(est.at[i, "head"])) for i in order[exact_top:]]
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(rest), size=min(n_random, len(rest)), replace=False)
    rand = [rest[i] for i in sorted(pick)]
    patch = counterfactual_patch(model, batch, [method], counterfactual)
    iv = _exact_for(method, patch)
    if exact_sweep is not None:
        exact = exact_sweep(iv, m, top + rand)
    else:
        exact = sweep(
            model, batch, methods=[iv], metrics=[m], stats=stats, heads=top + rand,
            batch_size=batch_size, layout=layout,
        )  # fmt: skip
    key = ["layer", "head"]
    joined = est[[*key, "effect"]].merge(exact[[*key, "effect"]], on=key, suffixes=("_est", ""))
    in_rand = joined.set_index(key).index.isin(rand)
    signed = method.startswith("atp:")
    row = {
        "method": method,
        "metric": est_metric,
        "exact_method": iv.label,
        "exact_metric": m.name,
        "spearman": spearman(joined["effect_est"].abs(), joined["effect"].abs()),
        "spearman_random": spearman(
            joined.loc[in_rand, "effect_est"].abs(), joined.loc[in_rand, "effect"].abs()
        ),
        "spearman_signed": spearman(joined["effect_est"], joined["effect"]) if signed else math.nan,
        "n_checked": len(joined),
        "n_random": int(in_rand.sum()),
    }
    return EstimateCheck(est, exact, pd.DataFrame([row]))
