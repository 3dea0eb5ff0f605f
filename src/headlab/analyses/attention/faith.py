"""Plausibility vs faithfulness: do the heads that *look at* the evidence *cause* the behaviour?

For every head, on the same examples:

- **plausibility** = attention mass from the query position(s) onto a token set
  (:func:`headlab.analyses.attention.attention_mass`; e.g. for ``names`` the mass from the final
  position onto the indirect-object name), averaged over examples;
- **faithfulness** = the exact causal effect of intervening on that head alone, through the engine:
  an ablation (``zero``, ``mean``, ``median``, ``peak``, ``resample``, ``scale:A``) or activation
  patching from a position-aligned counterfactual (``patch``). ``effect`` is positive when the
  intervention hurts (``-delta`` for metrics where higher is better), ``abs_effect = |effect|``.

:func:`compare_rankings` (:mod:`headlab.analyses.attention_rank`) turns the per-example tables
into one row per head (both scores and both 1-based ranks) and a one-row summary: Spearman rho of
plausibility against ``abs_effect`` over heads with a bias-corrected bootstrap CI over *examples*,
and the overlap of the two top-k sets.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from torch import nn

from headlab.analyses.attention import attention_mass
from headlab.analyses.attention_rank import TABLE_COLUMNS, compare_rankings
from headlab.analyses.ranking import bc_interval
from headlab.analyses.sweep import ablate_each
from headlab.batch import Batch
from headlab.engine import run_plans
from headlab.errors import ConfigError
from headlab.heads import heads_by_layer
from headlab.hooks import record
from headlab.interventions import Intervention, Patch, Plan, StatsSource, intervention_from_name
from headlab.metrics import Metric, get_metric
from headlab.models.layout import Layout, describe

__all__ = [
    "TABLE_COLUMNS",
    "Faithfulness",
    "bc_interval",
    "causal_effects",
    "causal_parts",
    "compare_rankings",
    "default_metric",
    "plausibility_faithfulness",
]

EFFECT_COLUMNS = [
    "example", "layer", "head", "method", "metric", "value", "baseline", "delta", "weight",
    "effect",
]  # fmt: skip


def default_metric(batch: Batch) -> str:
    """The task metric a batch implies: ``logit_diff`` with correct and wrong answers,
    ``answer_logprob`` with only a correct one, else next-token ``ce``."""
    if batch.answer_pos is not None and batch.correct is not None:
        return "logit_diff" if batch.wrong is not None else "answer_logprob"
    return "ce"


def _intervention(
    model: nn.Module,
    method: str | Intervention,
    batch: Batch,
    stats: StatsSource | None,
    counterfactual: Batch | None,
) -> tuple[str, Intervention]:
    if isinstance(method, Intervention):
        return method.label, method
    if method == "patch":
        if counterfactual is None:
            raise ConfigError(
                "method 'patch' patches in activations from a counterfactual: pass "
                "counterfactual=Batch (position-aligned with the batch); the CLI uses the "
                "statistics split"
            )
        if counterfactual.seq_len != batch.seq_len or len(counterfactual) < len(batch):
            raise ConfigError(
                f"the counterfactual ({len(counterfactual)} x {counterfactual.seq_len}) must have "
                f"at least {len(batch)} examples of length {batch.seq_len}, position-aligned"
            )
        device = next(model.parameters()).device
        cf = counterfactual.slice(0, len(batch)).to(device)
        return "patch", Patch(record(model, cf.model_inputs()))
    iv = intervention_from_name(method)
    if iv.needs is not None and stats is None:
        raise ConfigError(
            f"method {method!r} needs activation statistics ({iv.needs}); collect them with "
            "headlab.collect_stats(model, stats_batch) and pass stats=..., or use method='zero'"
        )
    return method, iv


def causal_parts(
    model: nn.Module,
    batch: Batch,
    *,
    method: str | Intervention = "zero",
    metric: str | Metric | None = None,
    stats: StatsSource | None = None,
    counterfactual: Batch | None = None,
    heads: Sequence[tuple[int, int]] | None = None,
    batch_size: int = 8,
    skip: Container[str] = (),
    on_forward: Callable[[int], None] | None = None,
    layout: Layout | None = None,
) -> Iterator[tuple[str, pd.DataFrame]]:
    """Yield ``(key, table)`` per layer: every chosen head of the layer intervened on alone,
    one row per example (columns :data:`EFFECT_COLUMNS`); keys in ``skip`` are not computed."""
    layout = layout if layout is not None else describe(model)
    m = get_metric(metric if metric is not None else default_metric(batch))
    name, iv = _intervention(model, method, batch, stats, counterfactual)
    by_layer = heads_by_layer(layout, heads)
    if all(f"effect-L{ly:03d}" in skip for ly in by_layer):
        return  # resumed with every part done: no clean pass needed
    clean = run_plans(model, batch, [Plan()], [m], batch_size=batch_size, layout=layout)[0][m.name]
    base = clean.per_example.double()  # [batch]
    for ly in sorted(by_layer):
        key = f"effect-L{ly:03d}"
        if key in skip:
            continue
        results = ablate_each(
            model, batch, iv, ly, by_layer[ly], [m], stats=stats, batch_size=batch_size,
            on_forward=on_forward, layout=layout,
        )  # fmt: skip
        rows = []
        for h, scores in zip(by_layer[ly], results, strict=True):
            value = scores[m.name].per_example.double()  # [batch]
            delta = value - base
            rows.append(
                pd.DataFrame(
                    {
                        "example": np.arange(len(batch)),
                        "layer": ly,
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
        yield key, pd.concat(rows, ignore_index=True)


def causal_effects(model: nn.Module, batch: Batch, **kwargs: Any) -> pd.DataFrame:
    """Every part of :func:`causal_parts` in one per-example table."""
    return pd.concat([t for _, t in causal_parts(model, batch, **kwargs)], ignore_index=True)


@dataclass(frozen=True, eq=False)
class Faithfulness:
    """What :func:`plausibility_faithfulness` measured.

    Attributes:
        table: one row per head (:data:`TABLE_COLUMNS`).
        summary: one row: ``spearman`` (plausibility vs ``abs_effect``) with ``ci_low``,
            ``ci_high``, ``spearman_signed``, ``top_k_overlap``, ``chance_overlap`` ...
        mass: per-example attention mass (:func:`attention_mass`).
        effects: per-example causal effects (:func:`causal_effects`).
    """

    table: pd.DataFrame
    summary: pd.DataFrame
    mass: pd.DataFrame
    effects: pd.DataFrame

    def top(self, by: str = "plausibility", k: int = 5) -> list[tuple[int, int]]:
        """The ``k`` first heads by ``plausibility`` or ``faithfulness`` rank."""
        if by not in ("plausibility", "faithfulness"):
            raise ConfigError(f"by must be 'plausibility' or 'faithfulness', got {by!r}")
        best = self.table.nsmallest(k, f"{by}_rank")
        return [(int(r.layer), int(r.head)) for r in best.itertuples()]


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
    token set (:func:`headlab.analyses.attention.key_mask`); ``method``/``metric``/``stats``/
    ``counterfactual``: the intervention (default metric: the one the batch implies)."""
    layout = layout if layout is not None else describe(model)
    mass = attention_mass(
        model, batch, keys=keys, words=words, positions=positions, tokenizer=tokenizer,
        batch_size=batch_size, layout=layout,
    )  # fmt: skip
    if mass["value"].isna().all():
        raise ConfigError(
            f"no example has a key to measure under keys={mass['keys'].iloc[0]!r}; choose "
            "another key set (e.g. 'context', or words that occur in the prompts)"
        )
    effects = causal_effects(
        model, batch, method=method, metric=metric, stats=stats, counterfactual=counterfactual,
        batch_size=batch_size, layout=layout, on_forward=on_forward,
    )  # fmt: skip
    table, summary = compare_rankings(mass, effects, n_boot=n_boot, ci=ci, seed=seed, top_k=top_k)
    return Faithfulness(table, summary, mass, effects)
