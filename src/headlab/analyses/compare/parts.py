"""The measures of ``compare`` by name, and as parts: each measure per example, one part at a time.

Measures, by name:

- ``ablation:METHOD`` (``ablation:zero``, ``ablation:mean`` ..., ``ablation:patch``: exact
  patching from the context's counterfactual): exact single-head ablation through the engine;
  per example the change of the metric, weighted by its scored tokens. One part per
  ``(method, layer)``.
- ``atp:METHOD``: attribution patching toward the same replacement (``atp`` alone means one per
  ablation method); per example ``sum_t (r - z) . dM/dz`` over its tokens / its scored tokens.
- ``gradient``: Michel et al.'s ``|dL_x/dxi_h|`` per example, layer-normalised after averaging.
  Every ``atp:*`` measure and ``gradient`` come from one forward + backward: one part.
- ``ig:METHOD[:STEPS]``: layer-wise integrated gradients toward the same replacement (``ig``
  alone means one per ablation method, :data:`~headlab.analyses.estimate.ig.DEFAULT_STEPS`
  steps; :mod:`headlab.analyses.estimate.ig`); per example as ``atp``. One part per measure.
- ``rollout``: head-level attention rollout from the target position to the context
  (:func:`headlab.analyses.estimate.rollout_per_example`).
- ``attention``: the raw attention weight
  (:func:`headlab.analyses.attention.mass.attention_mass`): the head's attention from the scored
  positions onto their key set (``attention_keys``; ``auto``: the earlier tokens except the first
  for a corpus, the induction targets on repeated sequences, the answer's tokens for ``names``),
  averaged over queries.

Every part returns ``{key: table}`` (one or more per-example tables, columns
:data:`~headlab.analyses.compare.stats.PER_EXAMPLE_COLUMNS`, saved under their keys, e.g.
``atp_zero``, ``ablation_zero-L003``); its ``keys`` say which.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from headlab.analyses.attention.mass import attention_mass
from headlab.analyses.compare.stats import PER_EXAMPLE_COLUMNS
from headlab.analyses.estimate import estimate_terms, rollout_per_example
from headlab.analyses.estimate.ig import DEFAULT_STEPS, is_ig, parse_ig
from headlab.analyses.sweep import COUNTERFACTUAL, ablate_each, check_method, method_intervention
from headlab.batch import Batch
from headlab.engine import run_plans
from headlab.errors import ConfigError
from headlab.interventions import Plan, intervention_from_name
from headlab.metrics import Scores, get_metric
from headlab.models.layout import Layout
from headlab.parts import Context, Part

__all__ = [
    "CHEAP_MEASURES",
    "AttentionPart",
    "ComparePart",
    "ExactPart",
    "GradientPart",
    "MeasurePart",
    "RolloutPart",
    "attention_per_example",
    "compare_plan",
    "measures",
    "part_key",
]

#: cheap measures accepted besides ``atp:METHOD``, ``ig`` and ``ig:METHOD[:STEPS]``
CHEAP_MEASURES = ("atp", "gradient", "rollout", "attention")

Tables = dict[str, pd.DataFrame]


def part_key(measure: str, layer: int | None = None) -> str:
    """``atp_zero``, ``ablation_zero-L003``: a file-name-safe key of a part."""
    key = measure.replace(":", "_")
    return key if layer is None else f"{key}-L{layer:03d}"


def measures(methods: Sequence[str], cheap: Sequence[str]) -> list[str]:
    """The measure names for exact ablation ``methods`` and ``cheap`` measures (``atp`` expands
    to ``atp:METHOD`` for every method, ``ig`` to ``ig:METHOD:STEPS``), checked."""
    out = [f"ablation:{m}" for m in methods]
    for m in methods:
        check_method(m)  # a clear error for an unknown method (patch: from a counterfactual)
    for c in cheap:
        if c == "atp":
            out += [f"atp:{m}" for m in methods]
        elif c == "ig":
            out += [f"ig:{m}:{DEFAULT_STEPS}" for m in methods]
        elif c in CHEAP_MEASURES or c.startswith("atp:"):
            out.append(c)
        elif c.startswith("ig:"):
            if parse_ig(c)[0] != "patch":
                intervention_from_name(parse_ig(c)[0])
            out.append(c)
        else:
            raise ConfigError(
                f"unknown measure {c!r}; choose from {', '.join(CHEAP_MEASURES)}, atp:METHOD, "
                "ig or ig:METHOD[:STEPS]"
            )
    if not methods:
        raise ConfigError("give at least one exact ablation method (the reference), e.g. zero")
    return list(dict.fromkeys(out))


def _frame(measure: str, metric: str, values: torch.Tensor, weight: torch.Tensor) -> pd.DataFrame:
    """Rows of ``values [example, layer, head]`` with ``weight [example]``."""
    n, n_layers, n_heads = values.shape
    v = torch.nan_to_num(values.double()).numpy()
    return pd.DataFrame(
        {
            "measure": measure,
            "metric": metric,
            "example": np.repeat(np.arange(n), n_layers * n_heads),
            "layer": np.tile(np.repeat(np.arange(n_layers), n_heads), n),
            "head": np.tile(np.arange(n_heads), n * n_layers),
            "value": v.reshape(-1),  # [example * layer * head]
            "weight": np.repeat(weight.double().numpy(), n_layers * n_heads),
        },
        columns=PER_EXAMPLE_COLUMNS,
    )


def _mean_terms(per: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Contributions summed over tokens -> per-example means (0 where nothing is scored)."""
    ok = weight > 0
    safe = torch.where(ok, weight, torch.ones_like(weight))
    return torch.where(ok[:, None, None], per / safe[:, None, None], 0.0), weight * ok


def _delta(ablated: Scores, clean: Scores) -> torch.Tensor:
    """``[example]`` change of each example's mean; token metrics difference token by token in
    float64, so the token-weighted mean over examples equals the sweep's ``delta`` to rounding."""
    if ablated.per_token is None:
        return ablated.per_example.double() - clean.per_example.double()
    diff = ablated.per_token.double() - clean.per_token.double()  # [example, pos]
    return torch.nan_to_num(diff).sum(1) / clean.weight.double()


@dataclass(frozen=True)
class ComparePart:
    """One measure (or one layer of an exact ablation) per example: ``key`` and its table."""

    key: str
    table: pd.DataFrame  # PER_EXAMPLE_COLUMNS


def attention_per_example(
    model: nn.Module,
    batch: Batch,
    *,
    keys: str = "auto",
    batch_size: int = 8,
    layout: Layout | None = None,
) -> ComparePart:
    """The raw attention-weight measure per example: :func:`attention_mass` (weight 0 for an
    example without keys to measure)."""
    mass = attention_mass(model, batch, keys=keys, batch_size=batch_size, layout=layout)
    ok = mass["value"].notna()
    table = mass.assign(
        measure="attention",
        metric=f"attention:{mass['keys'].iloc[0]}",
        value=mass["value"].where(ok, 0.0),
        weight=ok.astype(float),
    )
    return ComparePart("attention", table[PER_EXAMPLE_COLUMNS])


class MeasurePart(Part):
    """A part of ``compare``: ``run`` returns ``{key: per-example table}`` for each of ``keys``."""

    @property
    def keys(self) -> tuple[str, ...]:
        return (self.key,)

    def run(self, ctx: Context, on_forward: Callable[[int], None] | None = None) -> Tables:
        raise NotImplementedError


@dataclass(frozen=True)
class GradientPart(MeasurePart):
    """The ``atp:*`` and ``gradient`` measures of ``measures``, from one forward + backward per
    sub-batch (keys ``atp_zero``, ``gradient`` ...)."""

    measures: tuple[str, ...]
    metric: str

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(part_key(n) for n in self.measures)

    @property
    def key(self) -> str:
        return "+".join(self.keys)

    def run(self, ctx: Context, on_forward: Callable[[int], None] | None = None) -> Tables:
        m = get_metric(self.metric)
        terms = estimate_terms(
            ctx.model, ctx.batch, methods=list(self.measures), metric=m, stats=ctx.stats,
            counterfactual=ctx.batches.get(COUNTERFACTUAL), batch_size=ctx.batch_size,
            layout=ctx.layout,
        )  # fmt: skip
        out = {}
        for n in self.measures:
            values, weight = _mean_terms(terms.per_example[n], terms.weight)
            if n == "gradient":  # Michel: the mean of |dL_x/dxi| over examples, unweighted
                values, weight = values.abs(), (weight > 0).double()
            out[part_key(n)] = _frame(n, m.name, values, weight)
        return out


@dataclass(frozen=True)
class RolloutPart(MeasurePart):
    """Head-level rollout per example (key ``rollout``)."""

    sources: str = "context"

    @property
    def key(self) -> str:
        return "rollout"

    def run(self, ctx: Context, on_forward: Callable[[int], None] | None = None) -> Tables:
        values = rollout_per_example(
            ctx.model, ctx.batch, batch_size=ctx.batch_size, layout=ctx.layout,
            sources=self.sources,
        )  # fmt: skip
        return {self.key: _frame("rollout", "attention", values, torch.ones(len(values)))}


@dataclass(frozen=True)
class AttentionPart(MeasurePart):
    """The raw attention weight per example (key ``attention``)."""

    attention_keys: str = "auto"

    @property
    def key(self) -> str:
        return "attention"

    def run(self, ctx: Context, on_forward: Callable[[int], None] | None = None) -> Tables:
        part = attention_per_example(
            ctx.model, ctx.batch, keys=self.attention_keys, batch_size=ctx.batch_size,
            layout=ctx.layout,
        )  # fmt: skip
        return {self.key: part.table}


@dataclass(frozen=True)
class ExactPart(MeasurePart):
    """Exact ablation ``measure`` (``ablation:METHOD``) of every head of ``layer``, each alone,
    per example (key ``ablation_METHOD-L###``)."""

    measure: str
    layer: int
    metric: str

    @property
    def key(self) -> str:
        return part_key(self.measure, self.layer)

    def cost(self, ctx: Context) -> int:
        return ctx.layout.n_heads * len(ctx.batch)

    def run(self, ctx: Context, on_forward: Callable[[int], None] | None = None) -> Tables:
        m = get_metric(self.metric)
        layout, batch, ly = ctx.layout, ctx.batch, self.layer
        common = dict(batch_size=ctx.batch_size, layout=layout, cache=ctx.cache)
        c = run_plans(ctx.model, batch, [Plan()], [m], **common)[0][m.name]
        iv = method_intervention(self.measure.partition(":")[2], ctx, layers=[ly])
        res = ablate_each(
            ctx.model, batch, iv, ly, range(layout.n_heads), [m], stats=ctx.stats,
            on_forward=on_forward, **common,
        )  # fmt: skip
        delta = torch.stack([_delta(r[m.name], c) for r in res], 1)  # [example, head]
        weight = c.weight.double() * ~torch.isnan(delta).any(1)  # [example]
        full = torch.zeros(len(batch), layout.n_layers, layout.n_heads, dtype=torch.float64)
        full[:, ly] = torch.nan_to_num(delta.double())  # [example, head] into one layer
        table = _frame(self.measure, m.name, full, weight)
        return {self.key: table[table["layer"] == ly].reset_index(drop=True)}


def compare_plan(
    layout: Layout,
    names: Sequence[str],
    *,
    metric: str = "ce",
    rollout_sources: str = "context",
    attention_keys: str = "auto",
    skip: Container[str] = (),
) -> list[MeasurePart]:
    """The parts measuring ``names`` (from :func:`measures`), leaving out the keys in ``skip``:
    the cheap measures first, then exact ablation per ``(method, layer)``."""
    metric = get_metric(metric).name
    parts: list[MeasurePart] = []
    grad = [n for n in names if n.startswith("atp:") or n == "gradient"]
    todo = tuple(n for n in grad if part_key(n) not in skip)
    if todo:
        parts.append(GradientPart(todo, metric))
    for n in (n for n in names if is_ig(n) and part_key(n) not in skip):
        parts.append(GradientPart((n,), metric))  # layer by layer: a part of its own
    if "rollout" in names and "rollout" not in skip:
        parts.append(RolloutPart(rollout_sources))
    if "attention" in names and "attention" not in skip:
        parts.append(AttentionPart(attention_keys))
    for n in (n for n in names if n.startswith("ablation:")):
        parts.extend(
            ExactPart(n, ly, metric) for ly in range(layout.n_layers) if part_key(n, ly) not in skip
        )
    return parts
