"""Plausibility vs faithfulness: do the heads that *look at* the evidence *cause* the behaviour?

For every head, on the same examples:

- **plausibility** = attention mass from the query position(s) onto a token set
  (:func:`headlab.analyses.attention.mass.attention_mass`; e.g. for ``names`` the mass from the
  final position onto the indirect-object name), averaged over examples;
- **faithfulness** = the exact causal effect of intervening on that head alone, through the engine:
  an ablation (``zero``, ``mean``, ``median``, ``peak``, ``resample``, ``scale:A``) or activation
  patching from a position-aligned counterfactual (``patch``). ``effect`` is positive when the
  intervention hurts (``-delta`` for metrics where higher is better), ``abs_effect = |effect|``.
  Each layer's effects are one part (:class:`EffectPart`, key ``effect-L###``) of
  ``headlab attention``.

:func:`compare_rankings` (:mod:`headlab.analyses.attention.rank`) turns the per-example tables
into one row per head (both scores and both 1-based ranks) and a one-row summary: Spearman rho of
plausibility against ``abs_effect`` over heads with a bias-corrected bootstrap CI over *examples*,
and the overlap of the two top-k sets.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from torch import nn

from headlab.analyses.attention.mass import attention_mass, require_keys
from headlab.analyses.attention.rank import compare_rankings
from headlab.analyses.sweep import COUNTERFACTUAL, ablate_each, check_method, method_intervention
from headlab.batch import Batch
from headlab.engine import run_plans
from headlab.errors import ConfigError
from headlab.heads import Head, heads_by_layer, top_heads
from headlab.interventions import Intervention, Plan, StatsSource
from headlab.metrics import Metric, get_metric
from headlab.models.layout import Layout, describe
from headlab.parts import Context, Part

__all__ = [
    "COUNTERFACTUAL",
    "EFFECT_COLUMNS",
    "EffectPart",
    "Faithfulness",
    "causal_effects",
    "effect_parts",
    "faithfulness_metric",
    "plausibility_faithfulness",
]

EFFECT_COLUMNS = [
    "example", "layer", "head", "method", "metric", "value", "baseline", "delta", "weight",
    "effect",
]  # fmt: skip


def faithfulness_metric(batch: Batch) -> str:
    """The metric the causal effects are scored by when none is given: ``logit_diff`` with correct
    and wrong answers, ``answer_logprob`` with only a correct one, else next-token ``ce``."""
    if batch.answer_pos is not None and batch.correct is not None:
        return "logit_diff" if batch.wrong is not None else "answer_logprob"
    return "ce"


def _intervention(method: str | Intervention, ctx: Context, layer: int) -> tuple[str, Intervention]:
    """The method's table name and Intervention (:func:`method_intervention`: ``patch`` records
    the context's counterfactual), refusing a statistics method without statistics."""
    iv = method_intervention(method, ctx, layers=[layer])
    if iv.needs is not None and ctx.stats is None:
        raise ConfigError(
            f"method {method!r} needs activation statistics ({iv.needs}); collect them with "
            "headlab.collect_stats(model, stats_batch) and pass stats=..., or use method='zero'"
        )
    return (method if isinstance(method, str) else iv.label), iv


@dataclass(frozen=True)
class EffectPart(Part):
    """Each of ``heads`` of ``layer`` intervened on alone by ``method`` (an intervention name,
    ``"patch"`` — activations of the context's :data:`COUNTERFACTUAL` batch — or an Intervention
    value), scored by ``metric``: one row per example and head (:data:`EFFECT_COLUMNS`), key
    ``effect-L###``."""

    method: str | Intervention
    metric: str | Metric
    layer: int
    heads: tuple[int, ...]

    @property
    def key(self) -> str:
        return f"effect-L{self.layer:03d}"

    def cost(self, ctx: Context) -> int:
        return len(self.heads) * len(ctx.batch)

    def run(self, ctx: Context, on_forward: Callable[[int], None] | None = None) -> pd.DataFrame:
        m = get_metric(self.metric)
        name, iv = _intervention(self.method, ctx, self.layer)
        common = dict(batch_size=ctx.batch_size, layout=ctx.layout, cache=ctx.cache)
        clean = run_plans(ctx.model, ctx.batch, [Plan()], [m], **common)[0][m.name]
        base = clean.per_example.double()  # [batch]
        results = ablate_each(
            ctx.model, ctx.batch, iv, self.layer, self.heads, [m], stats=ctx.stats,
            on_forward=on_forward, **common,
        )  # fmt: skip
        rows = []
        for h, scores in zip(self.heads, results, strict=True):
            value = scores[m.name].per_example.double()  # [batch]
            delta = value - base
            rows.append(
                pd.DataFrame(
                    {
                        "example": np.arange(len(ctx.batch)),
                        "layer": self.layer,
                        "head": h,
                        "method": name,
                        "metric": m.name,
                        "value": value.numpy(),
                        "baseline": base.numpy(),
                        "delta": delta.numpy(),
                        "weight": clean.weight.double().numpy(),
                        "effect": (-delta if m.higher_is_better else delta).numpy(),
                    },
                    columns=EFFECT_COLUMNS,
                )
            )
        return pd.concat(rows, ignore_index=True)


def effect_parts(
    layout: Layout,
    batch: Batch,
    *,
    method: str | Intervention = "zero",
    metric: str | Metric | None = None,
    heads: Sequence[Head] | None = None,
) -> list[EffectPart]:
    """The causal effects as parts, layer by layer (default metric: :func:`faithfulness_metric`
    of ``batch``; default heads: every head)."""
    m = get_metric(metric if metric is not None else faithfulness_metric(batch))
    if isinstance(method, str):
        check_method(method)  # a bad name fails before any forward
    by_layer = heads_by_layer(layout, heads)
    return [EffectPart(method, m.name, ly, tuple(by_layer[ly])) for ly in sorted(by_layer)]


def causal_effects(
    model: nn.Module,
    batch: Batch,
    *,
    method: str | Intervention = "zero",
    metric: str | Metric | None = None,
    stats: StatsSource | None = None,
    counterfactual: Batch | None = None,
    heads: Sequence[Head] | None = None,
    batch_size: int = 8,
    on_forward: Callable[[int], None] | None = None,
    layout: Layout | None = None,
) -> pd.DataFrame:
    """Every chosen head intervened on alone: one row per example and head
    (:data:`EFFECT_COLUMNS`), every :class:`EffectPart` of :func:`effect_parts` in one table."""
    layout = layout if layout is not None else describe(model)
    parts = effect_parts(layout, batch, method=method, metric=metric, heads=heads)
    batches = {} if counterfactual is None else {COUNTERFACTUAL: counterfactual}
    ctx = Context(model, layout, batch, stats, batch_size, batches)
    return pd.concat([p.run(ctx, on_forward) for p in parts], ignore_index=True)


@dataclass(frozen=True, eq=False)
class Faithfulness:
    """What :func:`plausibility_faithfulness` measured.

    Attributes:
        table: one row per head (:data:`headlab.analyses.attention.rank.TABLE_COLUMNS`).
        summary: one row: ``spearman`` (plausibility vs ``abs_effect``) with ``ci_low``,
            ``ci_high``, ``spearman_signed``, ``top_k_overlap``, ``chance_overlap`` ...
        mass: per-example attention mass (:func:`attention_mass`).
        effects: per-example causal effects (:func:`causal_effects`).
    """

    table: pd.DataFrame
    summary: pd.DataFrame
    mass: pd.DataFrame
    effects: pd.DataFrame

    def top(self, by: str = "plausibility", k: int = 5) -> list[Head]:
        """The ``k`` first heads by ``plausibility`` or ``faithfulness`` rank."""
        score = {"plausibility": "plausibility", "faithfulness": "abs_effect"}.get(by)
        if score is None:
            raise ConfigError(f"by must be 'plausibility' or 'faithfulness', got {by!r}")
        return top_heads(self.table, score, k)  # the ranks' order: ties by layer, head


def plausibility_faithfulness(
    model: nn.Module,
    batch: Batch,
    *,
    keys: str = "auto",
    words: Sequence[str] | None = None,
    positions: Sequence[int] | None = None,
    tokenizer: Any | None = None,
    method: str | Intervention = "zero",
    metric: str | Metric | None = None,
    stats: StatsSource | None = None,
    counterfactual: Batch | None = None,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    top_k: int = 10,
    batch_size: int = 8,
    layout: Layout | None = None,
    on_forward: Callable[[int], None] | None = None,
) -> Faithfulness:
    """Rank every head by attention mass on a token set and by its exact causal effect, and
    compare the rankings (module docstring). ``keys``/``words``/``positions``/``tokenizer``: the
    token set (:func:`headlab.analyses.attention.mass.key_mask`); ``method``/``metric``/``stats``/
    ``counterfactual``: the intervention (default metric: the one the batch implies)."""
    layout = layout if layout is not None else describe(model)
    mass = attention_mass(
        model, batch, keys=keys, words=words, positions=positions, tokenizer=tokenizer,
        batch_size=batch_size, layout=layout,
    )  # fmt: skip
    require_keys(mass)
    effects = causal_effects(
        model, batch, method=method, metric=metric, stats=stats, counterfactual=counterfactual,
        batch_size=batch_size, layout=layout, on_forward=on_forward,
    )  # fmt: skip
    table, summary = compare_rankings(mass, effects, n_boot=n_boot, ci=ci, seed=seed, top_k=top_k)
    return Faithfulness(table, summary, mass, effects)
