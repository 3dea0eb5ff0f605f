"""Single-head importance sweeps: ablate each head alone, under each method, and measure.

The table is tidy: one row per ``(layer, head, method, metric)`` with ``value`` (the metric with
the head ablated), ``baseline`` (the clean model), ``delta = value - baseline``, and the spread of
the per-example deltas (``delta_sd``, ``delta_se``, ``n``). ``effect`` orients ``delta`` so that
positive always means "ablating this head hurts" (``-delta`` for metrics where higher is better).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Container, Iterable, Iterator, Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from torch import nn

from headlab.batch import Batch
from headlab.engine import run_plans
from headlab.errors import ConfigError
from headlab.interventions import Intervention, Plan, StatsSource, intervention_from_name
from headlab.metrics import Metric, Scores, get_metric
from headlab.models.layout import Layout, describe

__all__ = [
    "COLUMNS",
    "SweepPart",
    "check_heads",
    "effect",
    "rank_heads",
    "sweep",
    "sweep_parts",
    "tidy",
]

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


@dataclass(frozen=True)
class SweepPart:
    """The rows of one method on one layer: the unit a run directory saves and resumes."""

    method: str
    layer: int
    table: pd.DataFrame

    @property
    def key(self) -> str:
        return part_key(self.method, self.layer)


def part_key(method: str, layer: int) -> str:
    return f"{method.replace(':', '_')}-L{layer:03d}"


def _as_methods(methods: Sequence[str | Intervention]) -> list[tuple[str, Intervention]]:
    out = []
    for m in methods:
        iv = intervention_from_name(m) if isinstance(m, str) else m
        out.append((m if isinstance(m, str) else iv.label, iv))
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


def check_heads(
    heads: Iterable[Sequence[int]], layout: Layout | None = None
) -> list[tuple[int, int]]:
    """``heads`` as a list of ``(layer, head)`` integer pairs, in the order given; refused (with
    :class:`ConfigError`) if empty, if a head repeats, if an item is not a pair of integers, or,
    given ``layout``, if a head is not in the model. The one check of a chosen set of heads: the
    sweep, ``run_sweep`` and the CLI's ``--heads`` all use it."""
    out: list[tuple[int, int]] = []
    seen: set[tuple[int, int]] = set()
    for pair in heads:
        try:
            ly, h = (operator.index(x) for x in pair)
        except (TypeError, ValueError):
            raise ConfigError(
                f"heads must be (layer, head) pairs of integers, e.g. [(3, 5), (10, 1)]; got "
                f"{pair!r}"
            ) from None
        if (ly, h) in seen:
            raise ConfigError(f"head {ly}.{h} is given twice; list each head once")
        if layout is not None:
            try:
                layout.check_head(ly, h)
            except ConfigError as err:
                raise ConfigError(
                    f"{err}; choose heads this model has (layers 0..{layout.n_layers - 1}, heads "
                    f"0..{layout.n_heads - 1})"
                ) from None
        seen.add((ly, h))
        out.append((ly, h))
    if not out:
        raise ConfigError(
            "no heads given; list at least one (layer, head) pair, or pass heads=None (CLI: omit "
            "--heads) for every head"
        )
    return out


def heads_by_layer(
    layout: Layout, heads: Sequence[tuple[int, int]] | None = None
) -> dict[int, list[int]]:
    """``{layer: [head, ...]}`` of ``heads`` (default: every head), checked by
    :func:`check_heads` against ``layout``, in the order given."""
    chosen = check_heads(heads, layout) if heads is not None else layout.heads()
    out: dict[int, list[int]] = {}
    for ly, h in chosen:
        out.setdefault(ly, []).append(h)
    return out


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
) -> list[dict[str, Scores]]:
    """Each of ``heads`` of ``layer`` intervened on alone (one plan per head) through the
    engine; the scores of every plan, in order."""
    plans = [Plan.of({(layer, h): iv}) for h in heads]
    return run_plans(
        model, batch, plans, metrics, stats=stats, batch_size=batch_size, layout=layout,
        on_forward=on_forward,
    )  # fmt: skip


def sweep_parts(
    model: nn.Module,
    batch: Batch,
    *,
    methods: Sequence[str | Intervention] = ("zero",),
    metrics: Sequence[str | Metric] = ("ce",),
    stats: StatsSource | None = None,
    heads: Sequence[tuple[int, int]] | None = None,
    batch_size: int = 8,
    skip: Container[str] = (),
    on_forward: Callable[[int], None] | None = None,
    layout: Layout | None = None,
) -> Iterator[SweepPart]:
    """Yield the sweep one ``(method, layer)`` part at a time, skipping keys in ``skip``.

    Args:
        model: the model to probe.
        batch: evaluation examples.
        methods: method names (``zero``, ``mean``, ``peak``, ``median``, ``resample``,
            ``scale:ALPHA`` ...) or Intervention values.
        metrics: metric names or instances.
        stats: statistics for the methods that need them.
        heads: restrict to these ``(layer, head)`` pairs (default: every head).
        skip: part keys already done (for resuming).
        on_forward: progress callback, called with the examples of each forward.
    """
    layout = layout if layout is not None else describe(model)
    ms = [get_metric(m) for m in metrics]
    by_layer = heads_by_layer(layout, heads)
    clean = run_plans(model, batch, [Plan()], ms, batch_size=batch_size, layout=layout)[0]
    for name, iv in _as_methods(methods):
        for ly in sorted(by_layer):
            key = part_key(name, ly)
            if key in skip:
                continue
            results = ablate_each(
                model, batch, iv, ly, by_layer[ly], ms, stats=stats, batch_size=batch_size,
                on_forward=on_forward, layout=layout,
            )  # fmt: skip
            rows = []
            for h, scores in zip(by_layer[ly], results, strict=True):
                rows.extend(_rows(ly, h, name, ms, scores, clean))
            yield SweepPart(name, ly, pd.DataFrame(rows, columns=COLUMNS))


def sweep(model: nn.Module, batch: Batch, **kwargs: object) -> pd.DataFrame:
    """The whole sweep as one tidy table (see :func:`sweep_parts` for the arguments)."""
    parts = [p.table for p in sweep_parts(model, batch, **kwargs)]
    if not parts:
        return pd.DataFrame(columns=COLUMNS)
    return tidy(pd.concat(parts, ignore_index=True))


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
