"""Cheap importance estimates for every head at once, in the sweep's tidy table format.

- **Attribution patching** (``atp:zero``, ``atp:mean``, ``atp:median``, ``atp:peak``,
  ``atp:resample``, ``atp:scale:A``, ``atp:patch``): the first-order estimate of replacing each
  head's output ``z`` by ``r`` (0, its mean, its peak, a donor's, ``A z``, or the activation on a
  counterfactual input), ``delta ~ sum_t (r - z) . dM/dz``. One forward and one backward give
  ``dM/dz`` for every head (zero "taps" added to the heads' outputs, see
  :func:`headlab.hooks.add_to_heads`); a counterfactual costs one more forward.
- **Gradient importance** (``gradient``, Michel et al. 2019): ``I_h = E_x |dL(x)/dxi_h|`` with
  ``xi_h`` a multiplier on head ``h``, ``dL/dxi_h = sum_t z . dL/dz``; normalised by the layer's
  l2 norm. It comes from the same backward as attribution patching.
- **Head-level attention rollout** (``rollout``, METHODS.md section 6): the rollout mass routed
  from a target position to a set of source positions through each head
  (:mod:`headlab.analyses.estimate.rollout`).

Rows: ``value``/``baseline``/``delta`` are the estimated metric, the clean metric and the
estimated change for ``atp:*``; for ``gradient``, ``value`` is the layer-normalised importance,
``delta`` the raw ``E|dL/dxi|`` and ``baseline`` NaN; for ``rollout`` (metric ``attention``),
``value`` is the routed mass and ``baseline``/``delta`` are NaN. ``effect`` is what rankings sort
by (positive: the head matters).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from headlab.analyses.estimate.rollout import rollout_per_example
from headlab.analyses.sweep import COLUMNS, tidy
from headlab.batch import Batch
from headlab.errors import ConfigError
from headlab.hooks import add_to_heads, capture, record
from headlab.interventions import (
    Intervention,
    Patch,
    Selection,
    StatsSource,
    example_offset,
    intervention_from_name,
)
from headlab.metrics import Metric, Scores, get_metric
from headlab.models.layout import Layout, call_model, describe, input_device

__all__ = [
    "ESTIMATE_METHODS",
    "EstimateTerms",
    "check_methods",
    "counterfactual_patch",
    "estimate",
    "estimate_terms",
]

#: accepted method names (``atp:peak:kde[:BW]``, ``atp:resample:SEED`` and ``atp:scale:A`` too)
ESTIMATE_METHODS = (
    "atp:zero",
    "atp:mean",
    "atp:median",
    "atp:peak",
    "atp:resample",
    "atp:patch",
    "gradient",
    "rollout",
)


def _replacement_name(method: str) -> str | None:
    """``zero`` for ``atp:zero`` (``None`` for gradient / rollout); unknown names refused."""
    if method in ("gradient", "rollout"):
        return None
    head, _, rest = method.partition(":")
    if head != "atp" or not rest:
        raise ConfigError(
            f"unknown estimate {method!r}; use {', '.join(ESTIMATE_METHODS)}, atp:scale:A, "
            "atp:peak:kde or atp:resample:SEED"
        )
    return rest


def check_methods(methods: Sequence[str]) -> list[str]:
    """``methods`` (repeats dropped) if every one is an estimate method name, else a
    ConfigError naming the bad one; no model needed."""
    methods = list(dict.fromkeys(methods))
    if not methods:
        raise ConfigError(f"no estimate methods given; choose from {', '.join(ESTIMATE_METHODS)}")
    for m in methods:
        rest = _replacement_name(m)
        if rest is not None and rest != "patch":
            intervention_from_name(rest)
    return methods


def _parse(method: str, stats: StatsSource | None, patch: Patch | None) -> Intervention | None:
    """The replacement of an ``atp:*`` method (``None`` for gradient / rollout)."""
    rest = _replacement_name(method)
    if rest is None:
        return None
    if rest == "patch":
        if patch is None:
            raise ConfigError(
                "atp:patch estimates patching in a counterfactual: pass counterfactual=Batch "
                "(position-aligned with the batch); the CLI patches in the statistics split"
            )
        return patch
    iv = intervention_from_name(rest)
    if iv.needs is not None and stats is None:
        raise ConfigError(
            f"{method} has no replacement value without activation statistics ({iv.needs}); "
            "collect them with headlab.collect_stats(model, stats_batch) and pass stats=..."
        )
    return iv


def _total(scores: Scores, metric: Metric) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable sum of the scores and the per-example weights (scored tokens)."""
    if scores.per_token is not None:
        per = torch.nan_to_num(scores.per_token).sum(1)  # [batch]
        weight = (~torch.isnan(scores.per_token)).sum(1).to(per.dtype)
    else:
        ok = ~torch.isnan(scores.per_example)
        per = torch.nan_to_num(scores.per_example) * scores.weight.to(scores.per_example.device)
        weight = scores.weight.to(per.dtype) * ok
    total = per.sum()
    if not total.requires_grad:
        raise ConfigError(
            f"metric {metric.name!r} has no gradient (it counts hits), so attribution patching "
            "and gradient importance cannot use it; use ce, logit_diff or answer_logprob"
        )
    return total, weight.detach().double().cpu()


def _grad_pass(
    model: nn.Module,
    chunk: Batch,
    metric: Metric,
    layout: Layout,
    replacements: dict[str, Intervention | None],
    start: int,
    stats: StatsSource | None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, float]:
    """One forward + backward on ``chunk``: per method ``sum_{t,d} (r - z) . dTotal/dz`` (for
    ``gradient``: ``sum z . dTotal/dz``) as ``[batch, layer, head]``, the per-example weights,
    and the clean total."""
    device = input_device(model)
    dtype = next(model.parameters()).dtype
    chunk = chunk.to(device)
    n, seq = len(chunk), chunk.seq_len
    shape = (n, seq, layout.n_heads, layout.d_head)  # [batch, pos, head, d_head]
    taps = {
        ly: torch.zeros(shape, device=device, dtype=dtype, requires_grad=True)
        for ly in range(layout.n_layers)
    }
    zs: dict[int, torch.Tensor] = {}
    with (
        torch.enable_grad(),
        capture(model, zs.__setitem__, layout=layout),
        add_to_heads(model, taps, layout=layout),
    ):
        logits = call_model(model, chunk.model_inputs()).logits
        total, weight = _total(metric(logits, chunk, None), metric)
        grads = torch.autograd.grad(total, [taps[ly] for ly in range(layout.n_layers)])
    out: dict[str, torch.Tensor] = {}
    for name, iv in replacements.items():
        per_layer = []
        for ly, g in enumerate(grads):
            z = zs[ly]  # [batch, pos, head, d_head]
            if iv is None:  # gradient importance: xi_h multiplies z
                diff = z
            else:
                sel = Selection(
                    layer=ly,
                    heads=torch.arange(layout.n_heads),
                    neurons=torch.arange(layout.d_head),
                    positions=torch.arange(seq),
                )
                with example_offset(start):
                    diff = iv.apply(z, sel, stats) - z
            per_layer.append((diff.double() * g.double()).sum(dim=(1, 3)))  # [batch, head]
        out[name] = torch.stack(per_layer, dim=1).cpu()  # [batch, layer, head]
    return out, weight, float(total.detach())


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


@dataclass(frozen=True, eq=False)
class EstimateTerms:
    """Per-example terms of the gradient-based estimates (one metric), from which
    :func:`estimate` builds its rows; resampling examples (a bootstrap) resamples these.

    Attributes:
        per_example: ``{method: [example, layer, head]}``, each example's contribution to the
            batch total: ``sum_t (r - z) . dM/dz`` for ``atp:*``, ``sum_t z . dM/dz`` (Michel's
            ``dL/dxi`` summed over the example's tokens) for ``gradient``.
        weight: ``[example]`` scored tokens (the metric's per-example weight; 0 if none).
        baseline: the clean metric (token-weighted mean over the batch).
        metric: the metric's name.
    """

    per_example: dict[str, torch.Tensor]
    weight: torch.Tensor
    baseline: float
    metric: str


def counterfactual_patch(
    model: nn.Module, batch: Batch, methods: Sequence[str], counterfactual: Batch | None
) -> Patch | None:
    """The ``atp:patch`` replacement: the head outputs recorded on ``counterfactual`` (``None``
    if ``methods`` lack ``atp:patch`` or no counterfactual is given), checked to match ``batch``
    position by position."""
    if "atp:patch" not in methods or counterfactual is None:
        return None
    if counterfactual.seq_len != batch.seq_len or len(counterfactual) != len(batch):
        raise ConfigError(
            f"the counterfactual batch ({len(counterfactual)} x {counterfactual.seq_len}) "
            f"must match the batch ({len(batch)} x {batch.seq_len}) position by position"
        )
    device = input_device(model)
    return Patch(record(model, counterfactual.to(device).model_inputs(), layers=None))


def _terms(
    model: nn.Module,
    batch: Batch,
    metric: Metric,
    layout: Layout,
    replacements: Mapping[str, Intervention | None],
    stats: StatsSource | None,
    batch_size: int,
) -> EstimateTerms:
    if metric.needs_clean:
        raise ConfigError(
            f"metric {metric.name!r} compares with the clean run and has zero gradient "
            "there; estimate ce, logit_diff or answer_logprob instead"
        )
    sums: dict[str, list[torch.Tensor]] = {m: [] for m in replacements}
    weights, total = [], 0.0
    for c, chunk in enumerate(batch.chunks(batch_size)):
        per, w, t = _grad_pass(
            model, chunk, metric, layout, dict(replacements), c * batch_size, stats
        )
        for m in replacements:
            sums[m].append(per[m])
        weights.append(w)
        total += t
    weight = torch.cat(weights)
    per_example = {m: torch.cat(sums[m]) for m in replacements}  # [example, layer, head] each
    return EstimateTerms(per_example, weight, total / float(weight.sum()), metric.name)


def estimate_terms(
    model: nn.Module,
    batch: Batch,
    *,
    methods: Sequence[str] = ("atp:zero",),
    metric: str | Metric = "ce",
    stats: StatsSource | None = None,
    counterfactual: Batch | None = None,
    batch_size: int = 8,
    layout: Layout | None = None,
) -> EstimateTerms:
    """The per-example terms of the ``atp:*`` and ``gradient`` estimates for one metric (one
    forward + backward per sub-batch for all methods); see :class:`EstimateTerms`."""
    layout = layout if layout is not None else describe(model)
    methods = list(dict.fromkeys(methods))
    if not methods or "rollout" in methods:
        raise ConfigError(
            "estimate_terms takes atp:* and gradient methods; rollout has its own "
            "rollout_per_example()"
        )
    patch = counterfactual_patch(model, batch, methods, counterfactual)
    parsed = {m: _parse(m, stats, patch) for m in methods}
    return _terms(model, batch, get_metric(metric), layout, parsed, stats, batch_size)


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
    layout = layout if layout is not None else describe(model)
    methods = check_methods(methods)
    patch = counterfactual_patch(model, batch, methods, counterfactual)
    parsed = {m: _parse(m, stats, patch) for m in methods}
    grad_methods = {m: iv for m, iv in parsed.items() if m != "rollout"}
    tables: list[pd.DataFrame] = []
    if grad_methods:
        for metric in (get_metric(m) for m in metrics):
            terms = _terms(model, batch, metric, layout, grad_methods, stats, batch_size)
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
    return tidy(pd.concat(tables, ignore_index=True))
