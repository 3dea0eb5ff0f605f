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

This module computes the per-example terms (:func:`estimate_terms`, :class:`EstimateTerms`);
:mod:`headlab.analyses.estimate.tables` turns them into the whole-batch table
(:func:`~headlab.analyses.estimate.tables.estimate`) and the per-example one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from headlab.analyses.sweep import counterfactual_activations
from headlab.batch import Batch
from headlab.errors import ConfigError
from headlab.hooks import add_to_heads, capture
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
    "ig:zero",
    "ig:mean",
    "gradient",
    "rollout",
)


def _replacement_name(method: str) -> str | None:
    """``zero`` for ``atp:zero`` (``None`` for gradient / rollout); unknown names refused."""
    if method in ("gradient", "rollout"):
        return None
    head, _, rest = method.partition(":")
    if head == "ig" and rest:  # layer-wise integrated gradients, ig:METHOD[:STEPS]
        from headlab.analyses.estimate.ig import parse_ig

        return parse_ig(method)[0]
    if head != "atp" or not rest:
        raise ConfigError(
            f"unknown estimate {method!r}; use {', '.join(ESTIMATE_METHODS)}, atp:scale:A, "
            "atp:peak:kde, atp:resample:SEED or ig:METHOD[:STEPS] (e.g. ig:zero:2)"
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
                "(position-aligned with the batch); on the command line give --counterfactual "
                "FILE.jsonl of clean/corrupted pairs ('builtin' for --task names or capitals)"
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
    model: nn.Module,
    batch: Batch,
    methods: Sequence[str],
    counterfactual: Batch | None,
    *,
    batch_size: int = 8,
    layout: Layout | None = None,
) -> Patch | None:
    """The ``atp:patch`` replacement: the head outputs recorded on ``counterfactual`` (``None``
    if no method of ``methods`` patches or no counterfactual is given), checked to match
    ``batch`` position by position (:func:`headlab.analyses.sweep.counterfactual_activations`,
    the one recording exact ``patch`` uses too)."""
    if not any(_replacement_name(m) == "patch" for m in methods) or counterfactual is None:
        return None
    return Patch(
        counterfactual_activations(
            model, batch, counterfactual, batch_size=batch_size, layout=layout
        )
    )


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
    from headlab.analyses.estimate.ig import ig_terms, is_ig

    ig = {m: iv for m, iv in replacements.items() if is_ig(m)}
    if ig:  # its own passes, layer by layer (headlab.analyses.estimate.ig)
        terms = ig_terms(model, batch, ig, metric=metric, stats=stats, batch_size=batch_size,
                         layout=layout)  # fmt: skip
        replacements = {m: iv for m, iv in replacements.items() if m not in ig}
        if not replacements:
            return terms
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
    if ig:
        per_example.update(terms.per_example)
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
    patch = counterfactual_patch(
        model, batch, methods, counterfactual, batch_size=batch_size, layout=layout
    )
    parsed = {m: _parse(m, stats, patch) for m in methods}
    return _terms(model, batch, get_metric(metric), layout, parsed, stats, batch_size)
