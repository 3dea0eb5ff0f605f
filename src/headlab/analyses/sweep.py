"""Single-head importance sweeps: ablate each head alone, under each method, and measure.

The table is tidy: one row per ``(layer, head, method, metric)`` with ``value`` (the metric with
the head ablated), ``baseline`` (the clean model), ``delta = value - baseline``, and the spread of
the per-example deltas (``delta_sd``, ``delta_se``, ``n``). ``effect`` orients ``delta`` so that
positive always means "ablating this head hurts" (``-delta`` for metrics where higher is better).

A method is a name (``zero``, ``mean``, ``scale:-1`` ..., or ``patch``) or an Intervention value;
:func:`method_intervention` is the one place a method becomes the Intervention a part applies.
``patch`` replaces each head's output by its output on the position-aligned counterfactual input
(the context's :data:`COUNTERFACTUAL` batch), recorded once per part, not once per head.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from torch import nn

from headlab.batch import Batch
from headlab.engine import CleanCache, run_plans
from headlab.errors import ConfigError
from headlab.heads import heads_by_layer
from headlab.hooks import record
from headlab.interventions import (
    Activations,
    Intervention,
    Patch,
    Plan,
    StatsSource,
    intervention_from_name,
)
from headlab.metrics import Metric, Scores, get_metric
from headlab.models.layout import Layout, describe, input_device
from headlab.parts import Context, Part

__all__ = [
    "COLUMNS",
    "COUNTERFACTUAL",
    "PATCH",
    "SweepPart",
    "check_method",
    "counterfactual_activations",
    "effect",
    "method_intervention",
    "part_key",
    "rank_heads",
    "sweep",
    "sweep_plan",
    "tidy",
]

#: the method that patches in activations recorded on a counterfactual input
PATCH = "patch"
#: the name, in :attr:`headlab.parts.Context.batches`, of the batch ``patch`` records from
COUNTERFACTUAL = "counterfactual"

COLUMNS = [
    "layer",
    "head",
    "method",
    "metric",
    "value",
    "baseline",
    "delta",
    "delta_sd",
    "delta_se",
    "n",
    "effect",
]


def part_key(method: str, layer: int) -> str:
    return f"{method.replace(':', '_')}-L{layer:03d}"


def check_method(method: str) -> str:
    """``method`` if it names a method (``patch`` or an intervention name), else a ConfigError
    listing the methods; no model needed."""
    if method.strip() == PATCH:
        return PATCH
    try:
        intervention_from_name(method)
    except ConfigError as err:
        raise ConfigError(f"{err}, or patch (from --counterfactual pairs)") from None
    return method


def counterfactual_activations(
    model: nn.Module,
    batch: Batch,
    counterfactual: Batch,
    *,
    layers: Sequence[int] | None = None,
    batch_size: int = 8,
    layout: Layout | None = None,
) -> Activations:
    """The head outputs of every (or the chosen) layer on ``counterfactual``, recorded
    ``batch_size`` examples at a time: what :class:`~headlab.Patch` puts in place of ``batch``'s.

    ``counterfactual`` must be position-aligned with ``batch``: the same length and at least as
    many examples (the first ``len(batch)`` are used).
    """
    if counterfactual.seq_len != batch.seq_len or len(counterfactual) < len(batch):
        raise ConfigError(
            f"the counterfactual batch ({len(counterfactual)} x {counterfactual.seq_len}) must "
            f"match the batch ({len(batch)} x {batch.seq_len}) position by position; give "
            "clean/corrupted pairs of equal token length (--counterfactual FILE)"
        )
    layout = layout if layout is not None else describe(model)
    chosen = list(range(layout.n_layers)) if layers is None else sorted(set(layers))
    device = input_device(model)
    got: dict[int, list[torch.Tensor]] = {ly: [] for ly in chosen}
    for chunk in counterfactual.slice(0, len(batch)).chunks(batch_size):
        acts = record(model, chunk.to(device).model_inputs(), layers=chosen)
        for ly in chosen:
            got[ly].append(acts[ly])  # [chunk, pos, head, d_head]
    return Activations({ly: torch.cat(parts) for ly, parts in got.items()})


def method_intervention(
    method: str | Intervention, ctx: Context, *, layers: Sequence[int] | None = None
) -> Intervention:
    """The Intervention that ``method`` applies in ``ctx``: an Intervention value as it is, a
    method name parsed (:func:`~headlab.interventions.intervention_from_name`), and ``patch`` a
    :class:`~headlab.Patch` of the activations recorded on ``ctx.batches[COUNTERFACTUAL]`` (only
    ``layers``, default all: one forward over the counterfactual examples).

    Raises:
        ConfigError: ``patch`` without a counterfactual batch; an unknown method name.
    """
    if isinstance(method, Intervention):
        return method
    if method.strip() != PATCH:
        return intervention_from_name(method)
    cf = ctx.batches.get(COUNTERFACTUAL)
    if cf is None:
        raise ConfigError(
            "method 'patch' patches in activations recorded on a counterfactual input: give "
            "--counterfactual FILE.jsonl (clean/corrupted pairs; 'builtin' for --task names or "
            "capitals) on the command line, or pass counterfactual=Batch (position-aligned with "
            "the batch) in Python"
        )
    acts = counterfactual_activations(
        ctx.model, ctx.batch, cf, layers=layers, batch_size=ctx.batch_size, layout=ctx.layout
    )
    return Patch(acts)


@dataclass(frozen=True)
class SweepPart(Part):
    """One method on one layer: each of ``heads`` of ``layer`` ablated alone; the unit a run
    directory saves and resumes (key ``METHOD-L###``). ``intervention`` is an Intervention value
    or ``"patch"``, resolved against the context when the part runs
    (:func:`method_intervention`)."""

    method: str
    intervention: Intervention | str
    layer: int
    heads: tuple[int, ...]
    metrics: tuple[str | Metric, ...]
    prefix: str = ""  # another job's sweep saved in its own run directory: "sweep-"

    @property
    def key(self) -> str:
        return self.prefix + part_key(self.method, self.layer)

    def cost(self, ctx: Context) -> int:
        return len(self.heads) * len(ctx.batch)

    def run(self, ctx: Context, on_forward: Callable[[int], None] | None = None) -> pd.DataFrame:
        ms = [get_metric(m) for m in self.metrics]
        common = dict(batch_size=ctx.batch_size, layout=ctx.layout, cache=ctx.cache)
        clean = run_plans(ctx.model, ctx.batch, [Plan()], ms, **common)[0]
        iv = method_intervention(self.intervention, ctx, layers=[self.layer])
        results = ablate_each(
            ctx.model, ctx.batch, iv, self.layer, self.heads, ms, stats=ctx.stats,
            on_forward=on_forward, **common,
        )  # fmt: skip
        rows = []
        for h, scores in zip(self.heads, results, strict=True):
            rows.extend(_rows(self.layer, h, self.method, ms, scores, clean))
        return pd.DataFrame(rows, columns=COLUMNS)


def _as_methods(methods: Sequence[str | Intervention]) -> list[tuple[str, Intervention | str]]:
    """``(name, intervention)`` of each method; ``patch`` stays a name until a part runs."""
    out: list[tuple[str, Intervention | str]] = []
    for m in methods:
        if isinstance(m, str):
            out.append((m, PATCH if check_method(m) == PATCH else intervention_from_name(m)))
        else:
            out.append((m.label, m))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise ValueError(f"methods repeat: {names}")
    return out


def _rows(
    layer: int,
    head: int,
    method: str,
    ms: list[Metric],
    scores: dict[str, Scores],
    clean: dict[str, Scores],
) -> list[dict[str, object]]:
    rows = []
    for m in ms:
        s, c = scores[m.name], clean[m.name]
        per = (s.per_example - c.per_example).double()
        per = per[~torch.isnan(per)]
        n = int(per.numel())
        sd = float(per.std()) if n > 1 else math.nan
        value, base = s.mean, c.mean
        delta = value - base
        rows.append(
            {
                "layer": layer,
                "head": head,
                "method": method,
                "metric": m.name,
                "value": value,
                "baseline": base,
                "delta": delta,
                "delta_sd": sd,
                "delta_se": sd / math.sqrt(n) if n > 1 else math.nan,
                "n": n,
                "effect": -delta if m.higher_is_better else delta,
            }
        )
    return rows


def ablate_each(
    model: nn.Module,
    batch: Batch,
    iv: Intervention,
    layer: int,
    heads: Sequence[int],
    metrics: Sequence[Metric],
    *,
    stats: StatsSource | None = None,
    batch_size: int = 8,
    on_forward: Callable[[int], None] | None = None,
    layout: Layout | None = None,
    cache: CleanCache | None = None,
) -> list[dict[str, Scores]]:
    """Each of ``heads`` of ``layer`` intervened on alone (one plan per head) through the
    engine; the scores of every plan, in order."""
    plans = [Plan.of({(layer, h): iv}) for h in heads]
    return run_plans(
        model, batch, plans, metrics, stats=stats, batch_size=batch_size, layout=layout,
        on_forward=on_forward, cache=cache,
    )  # fmt: skip


def sweep_plan(
    layout: Layout,
    *,
    methods: Sequence[str | Intervention] = ("zero",),
    metrics: Sequence[str | Metric] = ("ce",),
    heads: Sequence[tuple[int, int]] | None = None,
    prefix: str = "",
) -> list[SweepPart]:
    """The parts of a sweep, method by method and layer by layer.

    Args:
        layout: the model's layout (heads are checked against it).
        methods: method names (``zero``, ``mean``, ``peak``, ``median``, ``resample``,
            ``scale:ALPHA`` ..., ``patch``: the context's counterfactual) or Intervention values.
        metrics: metric names or instances.
        heads: restrict to these ``(layer, head)`` pairs (default: every head).
        prefix: put before every part's key.
    """
    by_layer = heads_by_layer(layout, heads)
    return [
        SweepPart(name, iv, ly, tuple(by_layer[ly]), tuple(metrics), prefix)
        for name, iv in _as_methods(methods)
        for ly in sorted(by_layer)
    ]


def sweep(
    model: nn.Module,
    batch: Batch,
    *,
    methods: Sequence[str | Intervention] = ("zero",),
    metrics: Sequence[str | Metric] = ("ce",),
    stats: StatsSource | None = None,
    heads: Sequence[tuple[int, int]] | None = None,
    batch_size: int = 8,
    on_forward: Callable[[int], None] | None = None,
    layout: Layout | None = None,
    counterfactual: Batch | None = None,
) -> pd.DataFrame:
    """Ablate each head alone under each method: the whole sweep as one tidy table.

    Args:
        model: the model to probe.
        batch: evaluation examples.
        methods: method names or Intervention values (see :func:`sweep_plan`).
        metrics: metric names or instances.
        stats: statistics for the methods that need them.
        heads: restrict to these ``(layer, head)`` pairs (default: every head).
        on_forward: progress callback, called with the examples of each forward.
        counterfactual: what method ``patch`` records from, position-aligned with ``batch``
            (e.g. :attr:`headlab.data.counterfactual.Pairs.corrupted`).
    """
    layout = layout if layout is not None else describe(model)
    batches = {} if counterfactual is None else {COUNTERFACTUAL: counterfactual}
    ctx = Context(model, layout, batch, stats, batch_size, batches)
    parts = sweep_plan(layout, methods=methods, metrics=metrics, heads=heads)
    tables = [p.run(ctx, on_forward) for p in parts]
    if not tables:
        return pd.DataFrame(columns=COLUMNS)
    return tidy(pd.concat(tables, ignore_index=True))


def tidy(table: pd.DataFrame) -> pd.DataFrame:
    """Canonical row order and dtypes, so equal sweeps give equal tables."""
    out = table.sort_values(["method", "metric", "layer", "head"], kind="stable")
    out = out.reset_index(drop=True)
    return out.astype({"layer": "int64", "head": "int64", "n": "int64"})


def effect(table: pd.DataFrame) -> pd.Series:
    """The ``effect`` column (positive = ablating the head hurts)."""
    return table["effect"]


def rank_heads(table: pd.DataFrame) -> pd.DataFrame:
    """Heads sorted by effect within each (method, metric), with a 1-based ``rank`` column."""
    out = table.sort_values(
        ["method", "metric", "effect"], ascending=[True, True, False], kind="stable"
    ).copy()
    out["rank"] = out.groupby(["method", "metric"]).cumcount() + 1
    return out.reset_index(drop=True)
