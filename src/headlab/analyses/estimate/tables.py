"""The estimates as tidy tables: the whole batch (:func:`estimate`, the sweep's columns) and per
example (:func:`per_example_estimates`), from the terms of :mod:`headlab.analyses.estimate.atp`
and the rollout of :mod:`headlab.analyses.estimate.rollout`.

Rows: ``value``/``baseline``/``delta`` are the estimated metric, the clean metric and the
estimated change for ``atp:*``; for ``gradient``, ``value`` is the layer-normalised importance,
``delta`` the raw ``E|dL/dxi|`` and ``baseline`` NaN; for ``rollout`` (metric ``attention``),
``value`` is the routed mass and ``baseline``/``delta`` are NaN. ``effect`` is what rankings sort
by (positive: the head matters).

The same numbers per example: :func:`per_example_estimates` (one row per layer, head, example,
method, metric; ``headlab estimate`` saves them as ``per_example.parquet``), from
:func:`~headlab.analyses.estimate.atp.estimate_terms` or :func:`estimate_tables`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from headlab.analyses.estimate.atp import (
    EstimateTerms,
    _parse,
    _terms,
    check_methods,
    counterfactual_patch,
)
from headlab.analyses.estimate.rollout import rollout_per_example
from headlab.analyses.sweep import COLUMNS, tidy
from headlab.batch import Batch
from headlab.interventions import StatsSource
from headlab.metrics import Metric, get_metric
from headlab.models.layout import Layout, describe

__all__ = [
    "PER_EXAMPLE_COLUMNS",
    "EstimateTables",
    "estimate",
    "estimate_tables",
    "per_example_estimates",
]


def _table(
    method: str,
    metric: str,
    value: torch.Tensor,
    delta: torch.Tensor,
    per: torch.Tensor,
    effect: torch.Tensor,
    baseline: float = math.nan,
) -> pd.DataFrame:
    """Rows for every head from ``[layer, head]`` tensors; ``per`` ([example, layer, head]) gives
    the spread columns."""
    n_layers, n_heads = value.shape
    n = per.shape[0]
    sd = per.double().std(0) if n > 1 else torch.full(value.shape, math.nan)
    return pd.DataFrame(
        {
            "layer": np.repeat(np.arange(n_layers), n_heads),
            "head": np.tile(np.arange(n_heads), n_layers),
            "method": method,
            "metric": metric,
            "value": value.double().flatten().numpy(),
            "baseline": baseline,
            "delta": delta.double().flatten().numpy(),
            "delta_sd": sd.flatten().numpy(),
            "delta_se": (sd / math.sqrt(n)).flatten().numpy() if n > 1 else math.nan,
            "n": n,
            "effect": effect.double().flatten().numpy(),
        },
        columns=COLUMNS,
    )


def _atp_table(
    method: str, metric: Metric, per_example: torch.Tensor, weight: torch.Tensor, base: float
) -> pd.DataFrame:
    """``per_example``: [example, layer, head] contributions to the batch total."""
    ok = weight > 0
    delta = per_example.sum(0) / float(weight.sum())  # change of the token-weighted mean
    per = per_example[ok] / weight[ok][:, None, None]  # change of each example's own mean
    effect = -delta if metric.higher_is_better else delta
    return _table(method, metric.name, base + delta, delta, per, effect, base)


def _gradient_table(
    metric: Metric, per_example: torch.Tensor, weight: torch.Tensor
) -> pd.DataFrame:
    """Michel et al.: ``I = E_x |dL/dxi|``, divided by the layer's l2 norm (+1e-20)."""
    ok = weight > 0
    per = (per_example[ok] / weight[ok][:, None, None]).abs()  # [example, layer, head]
    raw = per.mean(0)  # [layer, head]
    norm = raw / (raw.norm(dim=1, keepdim=True) + 1e-20)
    return _table("gradient", metric.name, norm, raw, per, norm)


def _rollout_table(per: torch.Tensor) -> pd.DataFrame:
    mean = per.mean(0)
    return _table("rollout", "attention", mean, torch.full_like(mean, math.nan), per, mean)


#: columns of :func:`per_example_estimates`
PER_EXAMPLE_COLUMNS = ["layer", "head", "example", "method", "metric", "value", "weight"]


def per_example_estimates(terms: EstimateTerms) -> pd.DataFrame:
    """The estimates of ``terms`` per example, as a tidy table (:data:`PER_EXAMPLE_COLUMNS`).

    One row per ``(layer, head, example, method)``: ``value`` is the estimate for that example
    alone — for ``atp:*`` the estimated change of the example's own metric mean
    (``sum_t (r - z) . dM/dz`` over its scored tokens), for ``gradient`` Michel's signed
    ``dL_x/dxi`` (its own mean) — and ``weight`` its scored tokens (0, with ``value`` NaN, for an
    example with none). The whole-batch ``delta`` of :func:`estimate` is the weighted mean
    ``sum(weight * value) / sum(weight)`` for ``atp:*``; its ``gradient`` value is the mean of
    ``|value|`` over scored examples, divided by the layer's l2 norm.
    """
    weight = terms.weight.double()  # [example]
    ok = weight > 0
    safe = torch.where(ok, weight, torch.ones_like(weight))
    tables = []
    for method, per in terms.per_example.items():
        n, n_layers, n_heads = per.shape  # [example, layer, head]
        mean = per.double() / safe[:, None, None]
        mean = torch.where(ok[:, None, None], mean, torch.full_like(mean, math.nan))
        tables.append(
            pd.DataFrame(
                {
                    "layer": np.tile(np.repeat(np.arange(n_layers), n_heads), n),
                    "head": np.tile(np.arange(n_heads), n * n_layers),
                    "example": np.repeat(np.arange(n), n_layers * n_heads),
                    "method": method,
                    "metric": terms.metric,
                    "value": mean.numpy().reshape(-1),  # [example * layer * head]
                    "weight": np.repeat(weight.numpy(), n_layers * n_heads),
                },
                columns=PER_EXAMPLE_COLUMNS,
            )
        )
    return pd.concat(tables, ignore_index=True)


def _rollout_per_example_table(per: torch.Tensor) -> pd.DataFrame:
    """Rollout's ``[example, layer, head]`` mass as per-example rows (weight 1 each)."""
    ones = torch.ones(per.shape[0], dtype=torch.float64)
    return per_example_estimates(EstimateTerms({"rollout": per}, ones, math.nan, "attention"))


@dataclass(frozen=True, eq=False)
class EstimateTables:
    """What :func:`estimate_tables` returns: the whole-batch ``table`` (:func:`estimate`) and
    the same estimates per example (:func:`per_example_estimates`, rollout included)."""

    table: pd.DataFrame
    per_example: pd.DataFrame


def estimate(
    model: nn.Module,
    batch: Batch,
    *,
    methods: Sequence[str] = ("atp:zero",),
    metrics: Sequence[str | Metric] = ("ce",),
    stats: StatsSource | None = None,
    counterfactual: Batch | None = None,
    batch_size: int = 8,
    layout: Layout | None = None,
    rollout_target: int | None = None,
    rollout_sources: str = "context",
) -> pd.DataFrame:
    """Estimate every head's importance at once (see the module docstring for the methods).

    Args:
        model: the model (left unmodified; gradients are taken only w.r.t. head-output taps).
        batch: evaluation examples.
        methods: names from :data:`ESTIMATE_METHODS` (all ``atp:*`` and ``gradient`` share one
            forward + backward per metric).
        metrics: metrics with a gradient (``ce``, ``logit_diff``, ``answer_logprob`` ...).
        stats: statistics for ``atp:mean`` / ``median`` / ``peak`` / ``resample``.
        counterfactual: inputs for ``atp:patch``, position-aligned with ``batch``.
        rollout_target: position traced by ``rollout`` (default: ``answer_pos``, else the last
            real token).
        rollout_sources: ``context`` (positions 1..t-1) or ``previous`` (t-1).

    Returns:
        A tidy table with the sweep's columns, one row per (layer, head, method, metric).
    """
    return estimate_tables(
        model, batch, methods=methods, metrics=metrics, stats=stats,
        counterfactual=counterfactual, batch_size=batch_size, layout=layout,
        rollout_target=rollout_target, rollout_sources=rollout_sources,
    ).table  # fmt: skip


def estimate_tables(
    model: nn.Module,
    batch: Batch,
    *,
    methods: Sequence[str] = ("atp:zero",),
    metrics: Sequence[str | Metric] = ("ce",),
    stats: StatsSource | None = None,
    counterfactual: Batch | None = None,
    batch_size: int = 8,
    layout: Layout | None = None,
    rollout_target: int | None = None,
    rollout_sources: str = "context",
) -> EstimateTables:
    """:func:`estimate` (same arguments), with the per-example estimates it is made of."""
    layout = layout if layout is not None else describe(model)
    methods = check_methods(methods)
    patch = counterfactual_patch(
        model, batch, methods, counterfactual, batch_size=batch_size, layout=layout
    )
    parsed = {m: _parse(m, stats, patch) for m in methods}
    grad_methods = {m: iv for m, iv in parsed.items() if m != "rollout"}
    tables: list[pd.DataFrame] = []
    per_example: list[pd.DataFrame] = []
    if grad_methods:
        for metric in (get_metric(m) for m in metrics):
            terms = _terms(model, batch, metric, layout, grad_methods, stats, batch_size)
            per_example.append(per_example_estimates(terms))
            for m, per in terms.per_example.items():
                if m == "gradient":
                    tables.append(_gradient_table(metric, per, terms.weight))
                else:
                    tables.append(_atp_table(m, metric, per, terms.weight, terms.baseline))
    if "rollout" in parsed:
        per = rollout_per_example(
            model,
            batch,
            batch_size=batch_size,
            layout=layout,
            target=rollout_target,
            sources=rollout_sources,
        )
        tables.append(_rollout_table(per))
        per_example.append(_rollout_per_example_table(per))
    per_table = pd.concat(per_example, ignore_index=True)
    per_table = per_table.sort_values(["method", "metric", "layer", "head", "example"])
    return EstimateTables(
        tidy(pd.concat(tables, ignore_index=True)), per_table.reset_index(drop=True)
    )
