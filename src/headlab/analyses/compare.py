"""Rank agreement between head-importance measures on the same examples (METHODS.md section 6).

Measures, by name:

- ``ablation:METHOD`` (``ablation:zero``, ``ablation:mean`` ...): exact single-head ablation
  through the engine; per example the change of the metric, weighted by its scored tokens.
- ``atp:METHOD``: attribution patching toward the same replacement (``atp`` alone means one per
  ablation method); per example ``sum_t (r - z) . dM/dz`` over its tokens / its scored tokens.
- ``gradient``: Michel et al.'s ``|dL_x/dxi_h|`` per example, layer-normalised after averaging.
- ``rollout``: head-level attention rollout from the target position to the context
  (:func:`headlab.analyses.estimate.rollout_per_example`).
- ``attention``: the raw attention weight, :func:`headlab.analyses.attention.attention_mass`: the
  head's attention from the scored positions onto their key set (``attention_keys``; ``auto``:
  the earlier tokens except the first for a corpus, the induction targets on repeated sequences,
  the answer's tokens for ``names``), averaged over queries.

All measures are taken on the same batch and kept per example (a tidy table, see
:mod:`headlab.analyses.compare_stats`), so agreement gets bootstrap intervals over examples.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Container, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from headlab.analyses.compare_stats import (
    PER_EXAMPLE_COLUMNS,
    agreement,
    measure_scores,
    pairwise_agreement,
)
from headlab.analyses.estimate import estimate_terms, rollout_per_example
from headlab.analyses.sweep import ablate_each
from headlab.batch import Batch
from headlab.engine import run_plans
from headlab.errors import ConfigError
from headlab.interventions import Plan, StatsSource, intervention_from_name
from headlab.metrics import Scores, get_metric
from headlab.models.layout import Layout, describe

__all__ = [
    "CHEAP_MEASURES",
    "ComparePart",
    "Comparison",
    "attention_per_example",
    "compare",
    "compare_parts",
    "measures",
    "part_key",
    "summarise",
]

#: cheap measures accepted besides ``atp:METHOD``
CHEAP_MEASURES = ("atp", "gradient", "rollout", "attention")


@dataclass(frozen=True)
class ComparePart:
    """One measure (or one layer of an exact ablation): the unit a run directory saves."""

    key: str
    table: pd.DataFrame  # PER_EXAMPLE_COLUMNS


def part_key(measure: str, layer: int | None = None) -> str:
    """``atp_zero``, ``ablation_zero-L003``: a file-name-safe key of a part."""
    key = measure.replace(":", "_")
    return key if layer is None else f"{key}-L{layer:03d}"


def measures(methods: Sequence[str], cheap: Sequence[str]) -> list[str]:
    """The measure names for exact ablation ``methods`` and ``cheap`` measures (``atp`` expands
    to ``atp:METHOD`` for every method), checked."""
    out = [f"ablation:{m}" for m in methods]
    for m in methods:
        intervention_from_name(m)  # a clear error for an unknown method
    for c in cheap:
        if c == "atp":
            out += [f"atp:{m}" for m in methods]
        elif c in CHEAP_MEASURES or c.startswith("atp:"):
            out.append(c)
        else:
            raise ConfigError(
                f"unknown measure {c!r}; choose from {', '.join(CHEAP_MEASURES)} or atp:METHOD"
            )
    if not methods:
        raise ConfigError("give at least one exact ablation method (the reference), e.g. zero")
    if any(m.startswith("atp:patch") for m in out):
        raise ConfigError("atp:patch has no exact ablation counterpart here; use headlab estimate")
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


def attention_per_example(
    model: nn.Module,
    batch: Batch,
    *,
    keys: str = "auto",
    batch_size: int = 8,
    layout: Layout | None = None,
) -> ComparePart:
    """The raw attention-weight measure per example: :func:`headlab.analyses.attention.
    attention_mass` (weight 0 for an example without keys to measure)."""
    from headlab.analyses.attention import attention_mass

    mass = attention_mass(model, batch, keys=keys, batch_size=batch_size, layout=layout)
    ok = mass["value"].notna()
    table = mass.assign(
        measure="attention",
        metric=f"attention:{mass['keys'].iloc[0]}",
        value=mass["value"].where(ok, 0.0),
        weight=ok.astype(float),
    )
    return ComparePart("attention", table[PER_EXAMPLE_COLUMNS])


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
) -> Iterator[ComparePart]:
    """Yield every measure per example, one part at a time, skipping keys in ``skip``: cheap
    measures first (one part each), then exact ablation per ``(method, layer)``."""
    layout = layout if layout is not None else describe(model)
    names = measures(methods, cheap)
    m = get_metric(metric)
    grad = [n for n in names if n.startswith("atp:") or n == "gradient"]
    todo = [n for n in grad if part_key(n) not in skip]
    if todo:
        terms = estimate_terms(
            model, batch, methods=todo, metric=m, stats=stats, batch_size=batch_size,
            layout=layout,
        )  # fmt: skip
        for n in todo:
            values, weight = _mean_terms(terms.per_example[n], terms.weight)
            if n == "gradient":  # Michel: the mean of |dL_x/dxi| over examples, unweighted
                values, weight = values.abs(), (weight > 0).double()
            yield ComparePart(part_key(n), _frame(n, m.name, values, weight))
    if "rollout" in names and "rollout" not in skip:
        values = rollout_per_example(
            model, batch, batch_size=batch_size, layout=layout, sources=rollout_sources
        )
        yield ComparePart(
            "rollout", _frame("rollout", "attention", values, torch.ones(len(values)))
        )
    if "attention" in names and "attention" not in skip:
        yield attention_per_example(
            model, batch, keys=attention_keys, batch_size=batch_size, layout=layout
        )
    exact = [n for n in names if n.startswith("ablation:")]
    if all(part_key(n, ly) in skip for n in exact for ly in range(layout.n_layers)):
        return
    clean = run_plans(model, batch, [Plan()], [m], batch_size=batch_size, layout=layout)[0]
    c = clean[m.name]
    for n in exact:
        iv = intervention_from_name(n.partition(":")[2])
        for ly in range(layout.n_layers):
            key = part_key(n, ly)
            if key in skip:
                continue
            res = ablate_each(
                model, batch, iv, ly, range(layout.n_heads), [m], stats=stats,
                batch_size=batch_size, on_forward=on_forward, layout=layout,
            )  # fmt: skip
            delta = torch.stack([_delta(r[m.name], c) for r in res], 1)  # [example, head]
            weight = c.weight.double() * ~torch.isnan(delta).any(1)  # [example]
            full = torch.zeros(len(batch), layout.n_layers, layout.n_heads, dtype=torch.float64)
            full[:, ly] = torch.nan_to_num(delta.double())  # [example, head] into one layer
            table = _frame(n, m.name, full, weight)
            yield ComparePart(key, table[table["layer"] == ly].reset_index(drop=True))


@dataclass(frozen=True, eq=False)
class Comparison:
    """What :func:`compare` measured.

    Attributes:
        per_example: every measure per example (``measure, metric, example, layer, head, value,
            weight``).
        scores: whole-batch scores (``layer, head, measure, metric, value, rank``).
        agreement: each measure against the reference (Spearman, bootstrap CI, top-k overlap).
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
) -> Comparison:
    """Measure every head's importance with each measure on ``batch`` and compare the rankings.

    Args:
        methods: exact ablation methods (measures ``ablation:METHOD``); ``mean``, ``peak`` ...
            need ``stats``.
        cheap: ``atp`` (one per method), ``atp:METHOD``, ``gradient``, ``rollout``, ``attention``.
        metric: one metric with a gradient (``ce``, ``logit_diff``, ``answer_logprob``).
        reference: the measure the others are correlated with (default: ``ablation:`` of the
            first method).
        n_boot, ci, seed: bootstrap resamples of the examples, interval level, and seed.
        k: top-k overlap size.
        rollout_sources: ``context`` or ``previous`` (:func:`rollout_per_example`).
        attention_keys: key set of the ``attention`` measure (``auto``, ``context``,
            ``induction``, ``answer``, ``previous`` ...; :func:`attention_mass`).
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
        attention_keys=attention_keys,
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
