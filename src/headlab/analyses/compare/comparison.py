"""Rank agreement between head-importance measures on the same examples (METHODS.md section 6).

The measures (:mod:`headlab.analyses.compare.parts`) are taken on the same batch and kept per
example (a tidy table, see :mod:`headlab.analyses.compare.stats`), so agreement gets bootstrap
intervals over examples. :func:`compare` measures and summarises in one call; a job saves the
parts (:func:`compare_plan`) and :func:`summarise` reads them back.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Container, Iterator, Sequence
from dataclasses import dataclass

import pandas as pd
from torch import nn

from headlab.analyses.compare.parts import CHEAP_MEASURES, ComparePart, compare_plan, measures
from headlab.analyses.compare.stats import agreement, measure_scores, pairwise_agreement
from headlab.analyses.sweep import COUNTERFACTUAL
from headlab.batch import Batch
from headlab.errors import ConfigError
from headlab.interventions import StatsSource
from headlab.models.layout import Layout, describe
from headlab.parts import Context

__all__ = ["Comparison", "compare", "compare_parts", "interval", "summarise"]


def compare_parts(
    model: nn.Module,
    batch: Batch,
    *,
    methods: Sequence[str] = ("zero", "mean"),
    cheap: Sequence[str] = CHEAP_MEASURES,
    metric: str = "ce",
    stats: StatsSource | None = None,
    batch_size: int = 8,
    layout: Layout | None = None,
    rollout_sources: str = "context",
    attention_keys: str = "auto",
    skip: Container[str] = (),
    on_forward: Callable[[int], None] | None = None,
    counterfactual: Batch | None = None,
) -> Iterator[ComparePart]:
    """Yield every measure per example, one part at a time, skipping keys in ``skip``: cheap
    measures first, then exact ablation per ``(method, layer)`` (the parts of
    :func:`compare_plan`, run in this process)."""
    layout = layout if layout is not None else describe(model)
    names = measures(methods, cheap)
    batches = {} if counterfactual is None else {COUNTERFACTUAL: counterfactual}
    ctx = Context(model, layout, batch, stats, batch_size, batches)
    for part in compare_plan(
        layout, names, metric=metric, rollout_sources=rollout_sources,
        attention_keys=attention_keys, skip=skip,
    ):  # fmt: skip
        for key, table in part.run(ctx, on_forward).items():
            yield ComparePart(key, table)


@dataclass(frozen=True, eq=False)
class Comparison:
    """What :func:`compare` measured.

    Attributes:
        per_example: every measure per example (``measure, metric, example, layer, head, value,
            weight``).
        scores: whole-batch scores (``layer, head, measure, metric, value, rank``).
        agreement: each measure against the reference (Spearman, bootstrap CI, top-k overlap,
            recall of the reference's top-k, depth, cost in forward-pass equivalents).
        pairs: Spearman and top-k overlap between every pair of measures (point estimates).
    """

    per_example: pd.DataFrame
    scores: pd.DataFrame
    agreement: pd.DataFrame
    pairs: pd.DataFrame


def summarise(
    per_example: pd.DataFrame,
    *,
    reference: str,
    n_boot: int = 1000,
    k: int = 10,
    ci: float = 0.95,
    seed: int = 0,
    order: Sequence[str] | None = None,
) -> Comparison:
    """The :class:`Comparison` of per-example measures (e.g. parts read back from a run), in the
    order of ``order`` (default: as they appear), checked to hold every measure of ``order``."""
    if order is not None:
        missing = [m for m in order if m not in set(per_example["measure"])]
        if missing:
            raise ConfigError(f"the per-example table has no rows for {', '.join(missing)}")
        rank = {m: i for i, m in enumerate(order)}
        per_example = per_example[per_example["measure"].isin(rank)]
        key = per_example["measure"].map(rank)
        per_example = per_example.assign(_o=key).sort_values(["_o", "example", "layer", "head"])
        per_example = per_example.drop(columns="_o").reset_index(drop=True)
    scores = measure_scores(per_example)
    table = agreement(per_example, reference=reference, n_boot=n_boot, k=k, ci=ci, seed=seed)
    return Comparison(per_example, scores, table, pairwise_agreement(scores, k=k))


def compare(
    model: nn.Module,
    batch: Batch,
    *,
    methods: Sequence[str] = ("zero", "mean"),
    cheap: Sequence[str] = CHEAP_MEASURES,
    metric: str = "ce",
    stats: StatsSource | None = None,
    reference: str | None = None,
    n_boot: int = 1000,
    k: int = 10,
    ci: float = 0.95,
    seed: int = 0,
    batch_size: int = 8,
    layout: Layout | None = None,
    rollout_sources: str = "context",
    attention_keys: str = "auto",
    counterfactual: Batch | None = None,
) -> Comparison:
    """Measure every head's importance with each measure on ``batch`` and compare the rankings.

    Args:
        methods: exact ablation methods (measures ``ablation:METHOD``); ``mean``, ``peak`` ...
            need ``stats``.
        cheap: ``atp`` (one per method), ``atp:METHOD``, ``ig`` (one per method),
            ``ig:METHOD[:STEPS]`` (layer-wise integrated gradients), ``gradient``, ``rollout``,
            ``attention``.
        metric: one metric with a gradient (``ce``, ``logit_diff``, ``answer_logprob``).
        reference: the measure the others are correlated with (default: ``ablation:`` of the
            first method).
        n_boot, ci, seed: bootstrap resamples of the examples, interval level, and seed.
        k: top-k overlap and recall size.
        rollout_sources: ``context`` or ``previous`` (:func:`rollout_per_example`).
        attention_keys: key set of the ``attention`` measure (``auto``, ``context``,
            ``induction``, ``answer``, ``previous`` ...; :func:`attention_mass`).
        counterfactual: what method ``patch`` (``ablation:patch``) and ``atp:patch`` patch in,
            position-aligned with ``batch``.
    """
    names = measures(methods, cheap)
    reference = reference or names[0]
    if reference not in names:
        raise ConfigError(
            f"reference {reference!r} is not one of the measures compared ({', '.join(names)})"
        )
    parts = compare_parts(
        model, batch, methods=methods, cheap=cheap, metric=metric, stats=stats,
        batch_size=batch_size, layout=layout, rollout_sources=rollout_sources,
        attention_keys=attention_keys, counterfactual=counterfactual,
    )  # fmt: skip
    per_example = pd.concat([p.table for p in parts], ignore_index=True)
    return summarise(
        per_example, reference=reference, n_boot=n_boot, k=k, ci=ci, seed=seed, order=names
    )


def interval(row: pd.Series) -> str:
    """``"0.41 [0.30, 0.52]"`` for an agreement row."""
    if math.isnan(row["ci_low"]):
        return f"{row['spearman']:.2f}"
    return f"{row['spearman']:.2f} [{row['ci_low']:.2f}, {row['ci_high']:.2f}]"
