"""Pruning curves: ablate growing fractions of heads (or attention neurons) and measure the damage.

Units (``unit``):

- ``"head"``: whole heads; a fraction ``f`` removes ``round(f * n_layers * n_heads)`` heads.
- ``"neuron"``: the attention neurons of the peak-ablation paper, the ``n_heads * d_head``
  coordinates of the output projection's input in every layer; ``f`` removes
  ``round(f * n_heads * d_head)`` neurons *in each layer*.

Orders (``orders``):

- ``"random"``: one random permutation per seed (per layer for neurons); a fraction takes its
  first units, so the masks are **nested** (each contains the smaller ones) and every method is
  scored on the **same** masks (paired comparison).
- ``"sweep"``: heads least important first, by a single-head sweep's ``effect`` (``importance``).
- ``"iterative"``: greedy re-ranking (Michel et al.'s exact pruning): from the current pruned set,
  score every remaining head added to it and prune the least harmful ones, step by step.

The table is tidy, one row per ``(order, seed, method, fraction, metric)`` with ``value``,
``baseline`` (clean model), ``delta`` and ``effect`` (``delta`` oriented so positive = worse).
Everything is scored through :func:`headlab.engine.run_plans`; fraction 0 is the clean model.
Summaries of the table (:func:`summarize`, :func:`removable_fraction`) live in
:mod:`headlab.analyses.prune_summary`.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from torch import nn

from headlab.analyses.prune_summary import removable_fraction as removable_fraction
from headlab.analyses.prune_summary import summarize as summarize
from headlab.batch import Batch
from headlab.engine import run_plans
from headlab.errors import ConfigError
from headlab.interventions import Intervention, Plan, Site, StatsSource, intervention_from_name
from headlab.metrics import Metric, get_metric
from headlab.models.layout import Layout, describe
from headlab.parts import Context, OnForward, Part

__all__ = [
    "COLUMNS",
    "DEFAULT_FRACTIONS",
    "ORDERS",
    "UNITS",
    "PrunePart",
    "check_fractions",
    "check_orders",
    "part_key",
    "prune_curves",
    "prune_parts",
    "prune_plan",
    "random_units",
    "removable_fraction",
    "summarize",
]

ORDERS = ("random", "sweep", "iterative")
UNITS = ("head", "neuron")
DEFAULT_FRACTIONS = tuple(round(0.1 * i, 2) for i in range(11))
#: columns of the tidy table (one row per order, seed, method, fraction and metric)
COLUMNS = [
    "order", "seed", "method", "unit", "fraction", "n_pruned", "metric", "value", "baseline",
    "delta", "effect", "ranked_by",
]  # fmt: skip
Unit = tuple[int, int]  # (layer, head) or (layer, neuron index within the layer)


def part_key(order: str, method: str, seed: int) -> str:
    return f"prune-{order}-{method.replace(':', '_')}-s{seed}"


def check_fractions(fractions: Sequence[float]) -> list[float]:
    """Sorted unique fractions in [0, 1], with 0 (the clean model) added; clear error otherwise."""
    out = set()
    for f in fractions:
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 <= float(f) <= 1:
            raise ConfigError(
                f"pruning fractions must be numbers in [0, 1], got {f!r}; e.g. --fractions "
                "0,0.1,0.2,0.5,1"
            )
        out.add(float(f))
    return sorted(out | {0.0})


def check_orders(orders: Sequence[str], unit: str) -> None:
    """Refuse unknown units and orders, and importance orders on neurons (before any work)."""
    if unit not in UNITS:
        raise ConfigError(f"unit must be one of {UNITS}, got {unit!r}")
    for o in orders:
        if o not in ORDERS:
            raise ConfigError(f"unknown pruning order {o!r}; choose from {', '.join(ORDERS)}")
        if o != "random" and unit != "head":
            raise ConfigError(
                f"order {o!r} ranks whole heads; use --unit head (Python: unit='head') or --order "
                "random"
            )


def random_units(layout: Layout, unit: str, seed: int) -> list[Unit]:
    """A random pruning order. Heads: one permutation of every ``(layer, head)``. Neurons:
    one permutation per layer of ``(layer, neuron)``, interleaved so that any prefix of
    ``k * n_layers`` units holds ``k`` neurons of every layer."""
    gen = torch.Generator().manual_seed(seed)
    if unit == "head":
        heads = layout.heads()
        return [heads[i] for i in torch.randperm(len(heads), generator=gen).tolist()]
    perms = [torch.randperm(layout.n_units, generator=gen) for _ in range(layout.n_layers)]
    grid = torch.stack(perms, dim=1)  # [neuron rank, layer]
    return [(ly, int(grid[k, ly])) for k in range(layout.n_units) for ly in range(layout.n_layers)]


def _count(layout: Layout, unit: str, fraction: float) -> int:
    """Units pruned at ``fraction`` (neurons: in total over layers, the same in every layer)."""
    if unit == "head":
        return round(fraction * layout.n_layers * layout.n_heads)
    return round(fraction * layout.n_units) * layout.n_layers


def prune_plan(layout: Layout, unit: str, selected: Sequence[Unit], iv: Intervention) -> Plan:
    """``iv`` on every selected head (``unit="head"``) or neuron (``unit="neuron"``)."""
    if unit == "head":
        return Plan.heads(list(selected), iv) if selected else Plan()
    by_head: dict[tuple[int, int], list[int]] = {}
    for ly, u in selected:
        h, n = divmod(int(u), layout.d_head)
        by_head.setdefault((ly, h), []).append(n)
    entries = []
    for (ly, h), ns in sorted(by_head.items()):
        neurons = None if len(ns) == layout.d_head else tuple(sorted(ns))
        entries.append((Site(ly, (h,), neurons=neurons), iv))
    return Plan(tuple(entries))


def _importance_order(
    layout: Layout, importance: pd.DataFrame, method: str, metric: str
) -> tuple[list[Unit], str]:
    """Heads least important first from a sweep table; returns the order and its description."""
    need = {"layer", "head", "effect"}
    if not need <= set(importance.columns):
        raise ConfigError(
            f"the importance table needs columns {sorted(need)} (a headlab sweep table); "
            f"got {list(importance.columns)}"
        )
    sub = importance
    if "metric" in sub.columns:
        sub = sub[sub["metric"] == metric]
        if sub.empty:
            raise ConfigError(
                f"the sweep has no rows for metric {metric!r} (it has "
                f"{sorted(set(importance['metric']))}); rank by one of those (--rank-metric)"
            )
    used = method
    if "method" in sub.columns:
        if method not in set(sub["method"]):
            used = sorted(set(sub["method"]))[0]
        sub = sub[sub["method"] == used]
    keys = list(zip(sub["layer"].astype(int), sub["head"].astype(int), strict=True))
    if sorted(keys) != layout.heads():
        missing = sorted(set(layout.heads()) - set(keys))[:5]
        raise ConfigError(
            f"the sweep must score every head of this model exactly once ({len(layout.heads())} "
            f"heads); it has {len(keys)} rows for {used}/{metric} (missing e.g. {missing}). "
            "Run the sweep on all heads of this model and data"
        )
    ranked = sub.assign(layer=sub["layer"].astype(int), head=sub["head"].astype(int))
    ranked = ranked.sort_values(["effect", "layer", "head"], kind="stable")
    return [(int(r.layer), int(r.head)) for r in ranked.itertuples()], f"sweep:{used}/{metric}"


def _iterative_order(
    layout: Layout,
    iv: Intervention,
    counts: list[int],
    rank: Metric,
    run: Callable[[list[Plan], list[Metric]], list[dict]],
) -> list[Unit]:
    """Greedy order: at each count, add the remaining heads whose removal hurts least."""
    order: list[Unit] = []
    remaining = layout.heads()
    sign = -1.0 if rank.higher_is_better else 1.0
    for target in counts:
        need = target - len(order)
        if need <= 0:
            continue
        if need >= len(remaining):
            order += remaining
            remaining = []
            continue
        plans = [prune_plan(layout, "head", [*order, h], iv) for h in remaining]
        scores = run(plans, [rank])
        harm = [sign * s[rank.name].mean for s in scores]
        best = sorted(range(len(remaining)), key=lambda i: (harm[i], remaining[i]))[:need]
        order += [remaining[i] for i in sorted(best, key=lambda i: (harm[i], remaining[i]))]
        remaining = [h for i, h in enumerate(remaining) if i not in set(best)]
    return order + remaining


def _iterative_plans(n_heads: int, counts: list[int]) -> int:
    """Plans :func:`_iterative_order` scores to rank ``n_heads`` heads at ``counts``."""
    total, have = 0, 0
    for target in counts:
        need = target - have
        if need <= 0:
            continue
        if need < n_heads - have:
            total += n_heads - have
        have = min(n_heads, target)
    return total


@dataclass(frozen=True)
class PrunePart(Part):
    """One pruning curve (order, method, seed): the unit a run directory saves and resumes (key
    ``prune-ORDER-METHOD-sSEED``). The curve's units in pruning order come from ``seed``
    (``random``), ``ranking`` (``sweep``: heads least important first) or a greedy re-ranking run
    by the part itself (``iterative``, by ``rank_metric``)."""

    order: str
    method: str
    seed: int
    intervention: Intervention
    unit: str
    fractions: tuple[float, ...]
    metrics: tuple[str | Metric, ...]
    rank_metric: str | Metric
    ranked_by: str
    ranking: tuple[Unit, ...] | None = None

    @property
    def key(self) -> str:
        return part_key(self.order, self.method, self.seed)

    def cost(self, ctx: Context) -> int:
        plans = 1 + len(self.fractions)  # the clean run, then one plan per fraction
        if self.order == "iterative":
            counts = [_count(ctx.layout, self.unit, f) for f in self.fractions]
            plans += _iterative_plans(len(ctx.layout.heads()), counts)
        return plans * len(ctx.batch)

    def run(self, ctx: Context, on_forward: OnForward | None = None) -> pd.DataFrame:
        layout, iv = ctx.layout, self.intervention
        ms = [get_metric(m) for m in self.metrics]
        rank = get_metric(self.rank_metric)

        def run(plans: list[Plan], which: list[Metric]) -> list[dict]:
            return run_plans(
                ctx.model, ctx.batch, plans, which, stats=ctx.stats, batch_size=ctx.batch_size,
                layout=layout, on_forward=on_forward, cache=ctx.cache,
            )  # fmt: skip

        counts = [_count(layout, self.unit, f) for f in self.fractions]
        clean = run([Plan()], ms)[0]
        if self.order == "random":
            units = random_units(layout, self.unit, self.seed)
        elif self.order == "sweep":
            units = list(self.ranking or ())
        else:
            units = _iterative_order(layout, iv, counts, rank, run)
        plans = [prune_plan(layout, self.unit, units[:c], iv) for c in counts]
        results = run(plans, ms)
        rows = []
        for f, c, scores in zip(self.fractions, counts, results, strict=True):
            for m in ms:
                value, base = scores[m.name].mean, clean[m.name].mean
                delta = value - base
                rows.append(
                    [self.order, self.seed, self.method, self.unit, f, c, m.name, value, base,
                     delta, -delta if m.higher_is_better else delta, self.ranked_by]
                )  # fmt: skip
        return pd.DataFrame(rows, columns=COLUMNS)


def prune_parts(
    layout: Layout,
    *,
    methods: Sequence[str | Intervention] = ("zero", "mean", "peak", "resample"),
    orders: Sequence[str] = ("random",),
    unit: str = "head",
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seeds: Sequence[int] = (0, 1, 2),
    metrics: Sequence[str | Metric] = ("ce", "top1"),
    importance: pd.DataFrame | None = None,
    rank_metric: str | Metric | None = None,
) -> list[PrunePart]:
    """The pruning curves, one part per (order, method, seed) (see the module docstring).

    Args:
        methods: ablation methods; every method sees the same masks.
        orders: any of :data:`ORDERS` (``sweep`` and ``iterative`` rank heads: ``unit="head"``).
        fractions: fractions of units to prune, in [0, 1] (0 is always added).
        seeds: seeds of the random order (one curve each); importance orders use none (seed -1).
        importance: a sweep table (``layer, head, method, metric, effect``) for ``order="sweep"``;
            each method is ranked by its own rows when the sweep has them, else by the sweep's
            first method (the ``ranked_by`` column says which).
        rank_metric: metric that ranks heads (default: the first of ``metrics``).
    """
    grid = tuple(check_fractions(fractions))
    check_orders(orders, unit)
    if "sweep" in orders and importance is None:
        raise ConfigError("order 'sweep' needs a sweep table (importance=..., or --sweep DIR)")
    if "random" in orders and not seeds:
        raise ConfigError("order 'random' needs at least one seed")
    ms = tuple(metrics)
    for m in ms:
        get_metric(m)
    rank = rank_metric if rank_metric is not None else ms[0]
    rank_name = get_metric(rank).name
    parts: dict[str, PrunePart] = {}
    for order in orders:
        for method in methods:
            iv = intervention_from_name(method) if isinstance(method, str) else method
            name = method if isinstance(method, str) else iv.label
            for seed in seeds if order == "random" else (-1,):
                ranking = None
                if order == "random":
                    ranked_by = f"random:{seed}"
                elif order == "sweep":
                    heads, ranked_by = _importance_order(layout, importance, name, rank_name)
                    ranking = tuple(heads)
                else:
                    ranked_by = f"iterative:{name}/{rank_name}"
                part = PrunePart(
                    order, name, seed, iv, unit, grid, ms, rank, ranked_by, ranking
                )  # fmt: skip
                parts.setdefault(part.key, part)  # a repeated method or seed: one curve
    return list(parts.values())


def prune_curves(
    model: nn.Module,
    batch: Batch,
    *,
    stats: StatsSource | None = None,
    batch_size: int = 8,
    skip: Container[str] = (),
    on_forward: Callable[[int], None] | None = None,
    layout: Layout | None = None,
    **options: object,
) -> pd.DataFrame:
    """Every pruning curve of :func:`prune_parts` (``options``: its keyword arguments) as one
    tidy table, skipping the part keys in ``skip``; ``stats`` for the methods that need them."""
    layout = layout if layout is not None else describe(model)
    parts = prune_parts(layout, **options)
    for p in parts:
        if p.intervention.needs is not None and stats is None:
            raise ConfigError(f"method {p.method!r} needs activation statistics; pass stats=...")
    ctx = Context(model, layout, batch, stats, batch_size)  # one clean pass shared by the curves
    tables = [p.run(ctx, on_forward) for p in parts if p.key not in skip]
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=COLUMNS)
