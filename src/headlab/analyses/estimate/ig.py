"""Layer-wise integrated gradients (``ig:METHOD[:STEPS]``): attribution patching with the
gradient averaged along the path from each layer's head outputs to their replacement.

For layer ``L`` with clean head outputs ``z`` (``[batch, pos, head, d_head]``) and replacement
``r`` (0, the mean, the peak, a counterfactual's activations ...), every head of that layer moves
together along ``z(a) = z + a (r - z)``, ``a`` in [0, 1], the other layers staying clean:

    ``ig_h = sum_t (r_h - z_h) . sum_k w_k dM/dz_h |_{z(a_k)}``

with quadrature nodes ``a_k`` and weights ``w_k`` (:func:`nodes`: Gauss-Legendre by default,
which is the midpoint rule for one step; ``left`` with one step is ``a = 0``, plain attribution
patching). By the gradient theorem the heads of one layer sum to the exact effect of replacing
them all together, ``sum_h ig_h -> M(z(1)) - M(z(0))`` as the steps grow (*completeness*); a
layer with a single moving head converges to that head's exact ablation effect.

Cost: one clean forward records every layer's head outputs and block outputs; the forwards for
layer ``L`` replay the clean blocks before ``L`` (:func:`headlab.hooks.replay_blocks`) and run,
and differentiate, from ``L`` on. In forward-pass equivalents per example this is
:func:`headlab.analyses.estimate.cost.ig_cost`, counted as the passes run (``IGTerms.cost``).
Against the exact sweep's ``n_heads`` forwards from each layer on, one step costs about
``3 / n_heads`` of it. The step points of one layer are stacked along the batch, as many as fit
in ``batch_size`` rows.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from headlab.analyses.estimate.atp import EstimateTerms, _total
from headlab.analyses.estimate.cost import BACKWARD, forward_from
from headlab.batch import Batch
from headlab.errors import ConfigError, HeadlabError
from headlab.hooks import (
    BlockOutput,
    add_to_heads,
    blocks_of,
    capture,
    capture_blocks,
    replay_blocks,
)
from headlab.interventions import Intervention, Selection, StatsSource, example_offset
from headlab.metrics import Metric, get_metric
from headlab.models.layout import Layout, call_model, describe, input_device

__all__ = ["DEFAULT_STEPS", "RULES", "IGTerms", "ig_terms", "is_ig", "nodes", "parse_ig"]

#: quadrature rules for the path integral
RULES = ("gauss", "midpoint", "left")
#: steps of ``ig:METHOD`` without a count
DEFAULT_STEPS = 1


def is_ig(method: str) -> bool:
    """Whether ``method`` names layer-wise integrated gradients (``ig:...``)."""
    return method.startswith("ig:")


def parse_ig(method: str) -> tuple[str, int]:
    """``("zero", 4)`` for ``ig:zero:4``; a trailing integer is always the step count
    (``ig:scale:2`` is *scale* with 2 steps: write ``ig:scale:2:1``), default
    :data:`DEFAULT_STEPS`. The replacement name is checked by the caller."""
    head, _, rest = method.partition(":")
    if head != "ig" or not rest:
        raise ConfigError(f"{method!r} is not ig:METHOD[:STEPS] (e.g. ig:zero:2)")
    body, _, last = rest.rpartition(":")
    if body and last.lstrip("-").isdigit():
        steps = int(last)
        if steps < 1:
            raise ConfigError(f"{method}: the step count must be at least 1, e.g. ig:zero:2")
        return body, steps
    return rest, DEFAULT_STEPS


def nodes(steps: int, rule: str = "gauss") -> tuple[np.ndarray, np.ndarray]:
    """Quadrature nodes ``a_k`` in [0, 1] and weights ``w_k`` (summing to 1) for ``steps``
    points: ``gauss`` (Gauss-Legendre, exact for polynomials of degree ``2 steps - 1``),
    ``midpoint`` (``(k + 1/2) / steps``) or ``left`` (``k / steps``; one step is ``a = 0``)."""
    if steps < 1:
        raise ConfigError(f"integrated gradients need at least 1 step, got {steps}")
    if rule == "gauss":
        x, w = np.polynomial.legendre.leggauss(steps)  # on [-1, 1]
        return (x + 1) / 2, w / 2
    if rule == "midpoint":
        return (np.arange(steps) + 0.5) / steps, np.full(steps, 1.0 / steps)
    if rule == "left":
        return np.arange(steps) / steps, np.full(steps, 1.0 / steps)
    raise ConfigError(f"unknown quadrature rule {rule!r}; use one of {', '.join(RULES)}")


@dataclass(frozen=True, eq=False)
class IGTerms(EstimateTerms):
    """:class:`EstimateTerms` of layer-wise integrated gradients, plus what they cost.

    Attributes:
        cost: ``{method: forward-pass equivalents per example}``, counted as the passes ran
            (see :mod:`headlab.analyses.estimate.cost`).
    """

    cost: dict[str, float] = field(default_factory=dict)


def _clean_pass(
    model: nn.Module, chunk: Batch, metric: Metric, layout: Layout, blocks: nn.ModuleList | None
) -> tuple[dict[int, torch.Tensor], list[BlockOutput] | None, torch.Tensor, float]:
    """Every layer's clean head outputs, every block's clean output (``None``: no replay), the
    per-example weights and the clean metric total (scored as in attribution patching: a zero
    tap makes the total differentiable, nothing is differentiated)."""
    zs: dict[int, torch.Tensor] = {}
    outs: dict[int, BlockOutput] = {}
    shape = (len(chunk), chunk.seq_len, layout.n_heads, layout.d_head)
    dtype = next(model.parameters()).dtype
    tap = torch.zeros(shape, dtype=dtype, device=input_device(model), requires_grad=True)
    with ExitStack() as stack:
        stack.enter_context(torch.enable_grad())
        stack.enter_context(capture(model, zs.__setitem__, layout=layout))
        stack.enter_context(add_to_heads(model, {0: tap}, layout=layout))
        if blocks is not None:
            stack.enter_context(capture_blocks(blocks, outs.__setitem__))
        logits = call_model(model, chunk.model_inputs()).logits
        total, weight = _total(metric(logits, chunk, None), metric)
    replay = None
    if blocks is not None and len(outs) == len(blocks):
        replay = [outs[i] for i in range(len(blocks))]
    return zs, replay, weight, float(total.detach())


def _layer_grad(
    model: nn.Module,
    chunk: Batch,
    metric: Metric,
    layout: Layout,
    layer: int,
    diff: torch.Tensor,
    alphas: np.ndarray,
    blocks: nn.ModuleList | None,
    replay: list[BlockOutput] | None,
) -> torch.Tensor:
    """``[k * batch, pos, head, d_head]``: the gradient of the metric total at the head outputs of
    ``layer`` moved to ``z + a diff``, for each of the ``k`` ``alphas`` (stacked along the batch:
    copy ``j`` in rows ``j * batch ... (j + 1) * batch - 1``)."""
    k, n = len(alphas), len(chunk)
    shift = torch.cat([float(a) * diff for a in alphas])  # [k * batch, pos, head, d_head]
    tap = torch.zeros_like(shift, requires_grad=True)
    inputs = {key: v.repeat(k, *([1] * (v.ndim - 1))) for key, v in chunk.model_inputs().items()}
    with ExitStack() as stack:
        stack.enter_context(torch.enable_grad())
        if blocks is not None and replay is not None and layer > 0:
            stack.enter_context(replay_blocks(blocks, replay[:layer], repeat=k))
        stack.enter_context(add_to_heads(model, {layer: shift + tap}, layout=layout))
        logits = call_model(model, inputs).logits
        # each copy scored by the metric's own code, as in every other run
        total = sum(_total(metric(logits[j * n : (j + 1) * n], chunk, None), metric)[0]
                    for j in range(k))  # fmt: skip
        (grad,) = torch.autograd.grad(total, tap)
    return grad


def ig_terms(
    model: nn.Module,
    batch: Batch,
    replacements: dict[str, Intervention],
    *,
    metric: str | Metric = "ce",
    stats: StatsSource | None = None,
    batch_size: int = 8,
    layout: Layout | None = None,
    rule: str = "gauss",
    layers: list[int] | None = None,
) -> IGTerms:
    """Layer-wise integrated gradients of every head, per example (see the module docstring).

    Args:
        replacements: ``{method name: replacement}``, e.g. ``{"ig:zero:2": Zero()}``; the step
            count comes from each name (:func:`parse_ig`).
        metric: a metric with a gradient (``ce``, ``logit_diff``, ``answer_logprob``).
        stats: statistics for mean / median / peak / resample replacements.
        batch_size: examples per sub-batch; the step points of a layer are stacked into one
            forward as far as ``batch_size`` rows allow.
        rule: quadrature rule (:data:`RULES`).
        layers: the layers to attribute (default: all; the others get 0 and cost nothing).

    Returns:
        :class:`IGTerms`: per method ``[example, layer, head]`` contributions to the batch total
        (``sum_t (r - z) . avg dM/dz``, summed over the example's scored tokens), the weights,
        the clean baseline and the cost.
    """
    layout = layout if layout is not None else describe(model)
    metric = get_metric(metric)
    if metric.needs_clean:
        raise ConfigError(
            f"metric {metric.name!r} compares with the clean run and has zero gradient there; "
            "use ce, logit_diff or answer_logprob"
        )
    chosen = list(range(layout.n_layers)) if layers is None else sorted(set(layers))
    for ly in chosen:
        layout.check_head(ly, 0)
    steps = {m: parse_ig(m)[1] for m in replacements}
    device = input_device(model)
    try:
        blocks = blocks_of(model, layout)
    except HeadlabError:
        blocks = None
    sums: dict[str, list[torch.Tensor]] = {m: [] for m in replacements}
    cost = dict.fromkeys(replacements, 0.0)  # forward-pass equivalents, summed over examples
    weights, total = [], 0.0
    for c, chunk in enumerate(batch.chunks(batch_size)):
        chunk = chunk.to(device)
        n, seq = len(chunk), chunk.seq_len
        zs, replay, weight, clean_total = _clean_pass(model, chunk, metric, layout, blocks)
        weights.append(weight)
        total += clean_total
        sel = dict(heads=torch.arange(layout.n_heads), neurons=torch.arange(layout.d_head))
        per_forward = max(1, batch_size // n)  # step points stacked into one forward
        for m, iv in replacements.items():
            alphas, w = nodes(steps[m], rule)
            cost[m] += n  # the clean forward
            per_layer = torch.zeros(n, layout.n_layers, layout.n_heads, dtype=torch.float64)
            for ly in chosen:
                z = zs[ly]  # [batch, pos, head, d_head]
                with example_offset(c * batch_size):
                    r = iv.apply(z, Selection(layer=ly, positions=torch.arange(seq), **sel), stats)
                diff = (r - z).detach()
                acc = torch.zeros(diff.shape, dtype=torch.float64, device=diff.device)
                fraction = forward_from(ly, layout.n_layers) if replay is not None else 1.0
                for s in range(0, len(alphas), per_forward):
                    a, wk = alphas[s : s + per_forward], w[s : s + per_forward]
                    grad = _layer_grad(model, chunk, metric, layout, ly, diff, a, blocks, replay)
                    grad = grad.view(len(a), *diff.shape).double()  # [k, batch, pos, head, d_head]
                    wt = torch.as_tensor(wk, dtype=torch.float64, device=grad.device)
                    acc += (wt[:, None, None, None, None] * grad).sum(0)
                    cost[m] += len(a) * n * fraction * (1.0 + BACKWARD)
                per_layer[:, ly] = (diff.double() * acc).sum(dim=(1, 3)).cpu()  # [batch, head]
            sums[m].append(per_layer)
    weight = torch.cat(weights)
    per_example = {m: torch.cat(sums[m]) for m in replacements}  # [example, layer, head] each
    per_ex_cost = {m: v / len(batch) for m, v in cost.items()}
    return IGTerms(per_example, weight, total / float(weight.sum()), metric.name, per_ex_cost)
