"""The top-k search on a model: parts that evaluate heads on segments of the example order, the
driver that races every method with them, and :func:`top_k`, the in-process entry point.

Every value comes from the sweep's machinery: a part runs :func:`headlab.engine.run_plans` on the
examples of one *segment* (the examples between two sizes of the schedule, in the seeded order)
with one plan per head, and the method becomes an Intervention through
:func:`headlab.analyses.sweep.method_intervention`, so a head evaluated on every segment has
exactly the sweep's ``value``, ``baseline`` and ``delta``. Parts save per-example sums (the
metric's total and scored-token count of every example, ablated and clean); the racing rule
(:mod:`headlab.analyses.topk.race`) reads the per-example changes scaled so that their mean over
all examples is the sweep's token-weighted ``delta``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
import torch
from torch import nn

from headlab.analyses.sweep import COLUMNS, COUNTERFACTUAL, _as_methods, method_intervention
from headlab.analyses.topk.race import Race, RaceResult
from headlab.analyses.topk.rule import RaceRule, schedule
from headlab.batch import Batch
from headlab.engine import CleanCache, run_plans
from headlab.heads import Head, heads_by_layer
from headlab.interventions import (
    Intervention,
    Patch,
    Plan,
    Selection,
    StatsSource,
    current_offset,
    example_offset,
)
from headlab.metrics import Metric, Scores, get_metric
from headlab.models.layout import Layout, describe
from headlab.parts import Context, Part

__all__ = [
    "SEARCH_COLUMNS",
    "TopKCleanPart",
    "TopKPart",
    "TopKSearch",
    "search",
    "top_k",
]

#: the sweep's columns, then the search's own
SEARCH_COLUMNS = [*COLUMNS, "lo", "hi", "status", "in_top_k", "n_needed", "key"]
#: columns of a part's table: per-example sums of one head under one method and metric
PART_COLUMNS = ["layer", "head", "method", "metric", "example", "total", "count", "clean_total",
                "clean_count"]  # fmt: skip
#: key prefix of every part of a search (a run directory's other parts never start with it)
PREFIX = "topk-"
CLEAN_KEY = PREFIX + "clean"


@dataclass(frozen=True, eq=False)
class _OnRows(Intervention):
    """``inner`` applied to a batch of chosen examples: example ``i`` of it is example
    ``rows[i]`` of the whole batch, so input-dependent interventions (resample donors) pick what
    they pick in the full sweep."""

    inner: Intervention
    rows: tuple[int, ...]

    @property
    def needs(self) -> str | None:  # type: ignore[override]
        return self.inner.needs

    @property
    def label(self) -> str:
        return self.inner.label

    def apply(self, x: torch.Tensor, sel: Selection, stats: StatsSource | None) -> torch.Tensor:
        start = current_offset()
        out = []
        for i in range(x.shape[0]):  # one example at a time, each at its place in the batch
            with example_offset(self.rows[start + i]):
                out.append(self.inner.apply(x[i : i + 1], sel, stats))
        return torch.cat(out)


def _sums(scores: Scores) -> tuple[np.ndarray, np.ndarray]:
    """Per-example ``(total, count)`` in float64: what :attr:`Scores.mean` divides, summed over
    each example's scored tokens (or its one weighted value)."""
    if scores.per_token is not None:
        tok = scores.per_token.double()  # [batch, pos]
        ok = ~torch.isnan(tok)
        return torch.nan_to_num(tok).sum(1).numpy(), ok.sum(1).double().numpy()
    per = scores.per_example.double()
    ok = ~torch.isnan(per)
    w = scores.weight.double()
    return torch.nan_to_num(per * w).numpy(), torch.where(ok, w, 0.0).numpy()


@dataclass(frozen=True)
class TopKCleanPart(Part):
    """The clean model on every example: per-example sums of every metric (key ``topk-clean``);
    they turn each head's per-example changes into values whose mean is the sweep's delta."""

    metrics: tuple[str | Metric, ...]

    @property
    def key(self) -> str:
        return CLEAN_KEY

    def cost(self, ctx: Context) -> int:
        return len(ctx.batch)

    def run(self, ctx: Context, on_forward: Callable[[int], None] | None = None) -> pd.DataFrame:
        ms = [get_metric(m) for m in self.metrics]
        clean = run_plans(
            ctx.model, ctx.batch, [Plan()], ms, batch_size=ctx.batch_size, layout=ctx.layout,
            cache=ctx.cache, on_forward=on_forward,
        )[0]  # fmt: skip
        frames = []
        for m in ms:
            total, count = _sums(clean[m.name])
            frames.append(pd.DataFrame({
                "metric": m.name, "example": np.arange(len(total)), "total": total,
                "count": count,
            }))  # fmt: skip
        return pd.concat(frames, ignore_index=True)


@dataclass(frozen=True)
class TopKPart(Part):
    """``heads`` of ``layer`` under one method, each ablated alone, on the examples ``rows`` (one
    segment of the order) in round ``round`` (key ``topk-METHOD-R##-S##-L###``)."""

    method: str
    intervention: Intervention | str
    layer: int
    heads: tuple[int, ...]
    metrics: tuple[str | Metric, ...]
    rows: tuple[int, ...]
    round: int
    segment: int

    @property
    def key(self) -> str:
        name = self.method.replace(":", "_")
        return f"{PREFIX}{name}-R{self.round:02d}-S{self.segment:02d}-L{self.layer:03d}"

    def cost(self, ctx: Context) -> int:
        return len(self.heads) * len(self.rows)

    def run(self, ctx: Context, on_forward: Callable[[int], None] | None = None) -> pd.DataFrame:
        ms = [get_metric(m) for m in self.metrics]
        index = torch.tensor(self.rows, dtype=torch.long)
        batch = ctx.batch.select(index)  # [segment examples, pos]
        batches = dict(ctx.batches)
        if COUNTERFACTUAL in batches:  # patch: recorded on this segment's pairs only
            batches[COUNTERFACTUAL] = batches[COUNTERFACTUAL].select(index)
        sub = replace(ctx, batch=batch, batches=batches)
        iv = method_intervention(self.intervention, sub, layers=[self.layer])
        if not isinstance(iv, Patch):  # a Patch recorded on these rows indexes them already
            iv = _OnRows(iv, self.rows)
        cache = ctx.caches.setdefault(f"{PREFIX}S{self.segment:02d}", CleanCache())
        common = dict(batch_size=ctx.batch_size, layout=ctx.layout, cache=cache)
        clean = run_plans(ctx.model, batch, [Plan()], ms, **common)[0]
        plans = [Plan.of({(self.layer, h): iv}) for h in self.heads]
        scores = run_plans(
            ctx.model, batch, plans, ms, stats=ctx.stats, on_forward=on_forward, **common
        )
        frames = []
        for h, sc in zip(self.heads, scores, strict=True):
            for m in ms:
                total, count = _sums(sc[m.name])
                c_total, c_count = _sums(clean[m.name])
                frames.append(pd.DataFrame({
                    "layer": self.layer, "head": h, "method": self.method, "metric": m.name,
                    "example": np.asarray(self.rows), "total": total, "count": count,
                    "clean_total": c_total, "clean_count": c_count,
                }))  # fmt: skip
        return pd.concat(frames, ignore_index=True)[PART_COLUMNS]


@dataclass
class TopKSearch:
    """What a search found.

    Attributes:
        table: one row per ``(layer, head, method, metric)``: the sweep's columns on the examples
            the head was evaluated on (``n`` of them), the interval ``lo``/``hi`` of its full-sweep
            ``delta``, ``status`` (``top-k``, ``eliminated``, ``undecided``), ``in_top_k`` (the
            ``k`` returned), ``n_needed`` (undecided heads: examples that would likely decide)
            and ``key``, what heads are ranked by (``|delta|``, ``effect`` or ``-effect``).
        summary: per ``"method/metric"``: ``guaranteed``, ``statistical`` (whether an interval
            decided anything), the heads returned, and the rounds.
        cost: forward-pass tokens of the search and of the full sweep, and their ratio.
        rule: the racing rule used.
    """

    table: pd.DataFrame
    summary: dict[str, dict[str, object]]
    cost: dict[str, float]
    rule: RaceRule
    races: dict[str, RaceResult] = field(default_factory=dict, repr=False)

    def top(self) -> pd.DataFrame:
        """The ``k`` heads returned per method and metric, best first."""
        return ranking(self.table)[lambda t: t["in_top_k"]]


def ranking(table: pd.DataFrame) -> pd.DataFrame:
    """Rows in the order of the answer: per (method, metric) the returned heads first, then the
    undecided, then the eliminated, each by the ranking key; ``rank`` counts from 1."""
    order = {"top-k": 0, "undecided": 1, "eliminated": 2}
    out = table.assign(_in=~table["in_top_k"], _st=table["status"].map(order), _key=-table["key"])
    out = out.sort_values(
        ["method", "metric", "_in", "_st", "_key", "layer", "head"], kind="stable"
    )
    out = out.drop(columns=["_in", "_st", "_key"]).reset_index(drop=True)
    out["rank"] = out.groupby(["method", "metric"]).cumcount() + 1
    return out


def search(
    layout: Layout,
    n_examples: int,
    tokens_per_example: int,
    *,
    methods: Sequence[str | Intervention],
    metrics: Sequence[str | Metric],
    rule: RaceRule,
    run_parts: Callable[[list[Part]], list[pd.DataFrame]],
    heads: Sequence[Head] | None = None,
) -> TopKSearch:
    """Race every method's heads to the top ``rule.k`` of every metric.

    ``run_parts`` runs a list of parts and returns their tables in order (a job: run the missing
    ones through an executor, save them, read them back; :func:`top_k`: run them here). The parts
    of each round depend only on the tables of earlier rounds, so the same calls happen again on
    resume.
    """
    ms = [get_metric(m) for m in metrics]
    names = [m.name for m in ms]
    by_layer = heads_by_layer(layout, heads)
    index: list[Head] = [(ly, h) for ly in sorted(by_layer) for h in by_layer[ly]]
    pos = {hd: i for i, hd in enumerate(index)}
    rule = rule.check(len(index), n_examples)
    meths = _as_methods(methods)
    clean = run_parts([TopKCleanPart(tuple(metrics))])[0]
    c_total = {m: float(clean[clean.metric == m]["count"].sum()) for m in names}
    signs = np.array([-1.0 if m.higher_is_better else 1.0 for m in ms])
    delta = (1 - rule.confidence) / len(meths)
    races = {name: Race(len(index), n_examples, len(ms), rule, signs=signs, delta=delta)
             for name, _ in meths}  # fmt: skip
    sizes = schedule(n_examples, rule.first, rule.growth)
    bounds = [0, *sizes]
    order = next(iter(races.values())).order
    tables: list[pd.DataFrame] = []
    for rnd in range(len(sizes) + 1):
        work = {name: race.plan() for name, race in races.items()}
        if not any(work.values()):
            break
        parts = []
        for name, iv in meths:
            need: dict[tuple[int, int], list[int]] = {}  # (segment, layer) -> heads
            for i, start, stop in work[name]:
                for s in range(len(sizes)):
                    if start <= bounds[s] and bounds[s + 1] <= stop:
                        need.setdefault((s, index[i][0]), []).append(index[i][1])
            for (s, ly), hs in sorted(need.items()):
                rows = tuple(int(r) for r in order[bounds[s] : bounds[s + 1]])
                parts.append(TopKPart(name, iv, ly, tuple(hs), tuple(metrics), rows, rnd, s))
        got = pd.concat(run_parts(parts), ignore_index=True)
        tables.append(got)
        z = _values(got, names, n_examples, c_total)
        for name, race in races.items():
            for i, start, stop in work[name]:
                ly, h = index[i]
                vals = z[name][(ly, h)]  # {example: [metric]}
                race.add(i, start, np.stack([vals[int(e)] for e in order[start:stop]]))
            race.decide(work[name])
    results = {name: race.result() for name, race in races.items()}
    table = _table(pd.concat(tables, ignore_index=True), results, index, pos, ms, rule)
    evals = sum(r.evaluations for r in results.values())
    full = len(meths) * len(index) * n_examples
    cost = {
        "search_tokens": float((evals + 2 * n_examples) * tokens_per_example),
        "sweep_tokens": float((full + n_examples) * tokens_per_example),
        "evaluations": float(evals),
        "sweep_evaluations": float(full),
    }
    cost["fraction"] = cost["search_tokens"] / cost["sweep_tokens"]
    summary = _summary(table, results, names, rule, n_examples, index)
    return TopKSearch(table, summary, cost, rule, results)


def _values(
    got: pd.DataFrame, metrics: list[str], n_examples: int, c_total: dict[str, float]
) -> dict[str, dict[Head, dict[int, np.ndarray]]]:
    """Per method and head: each example's ``N (total - clean_total) / clean count of all
    examples`` per metric, whose mean over all examples is the sweep's delta."""
    out: dict[str, dict[Head, dict[int, np.ndarray]]] = {}
    col = {m: i for i, m in enumerate(metrics)}
    for r in got.itertuples(index=False):
        per = out.setdefault(r.method, {}).setdefault((int(r.layer), int(r.head)), {})
        vec = per.setdefault(int(r.example), np.zeros(len(metrics)))
        denom = c_total[r.metric]
        vec[col[r.metric]] = n_examples * (r.total - r.clean_total) / denom if denom else 0.0
    return out


def _table(
    parts: pd.DataFrame,
    results: dict[str, RaceResult],
    index: list[Head],
    pos: dict[Head, int],
    ms: list[Metric],
    rule: RaceRule,
) -> pd.DataFrame:
    """The sweep's rows on the examples each head was evaluated on, with the search's columns."""
    rows = []
    col = {m.name: i for i, m in enumerate(ms)}
    for (ly, h, meth, met), g in parts.groupby(["layer", "head", "method", "metric"], sort=True):
        m = ms[col[met]]
        i, j = pos[(int(ly), int(h))], col[met]
        res = results[meth]
        value, base = (
            g["total"].sum() / g["count"].sum(),
            g["clean_total"].sum() / g["clean_count"].sum(),
        )
        per = (g["total"] / g["count"] - g["clean_total"] / g["clean_count"]).dropna()
        n = len(g)
        sd = float(per.std()) if len(per) > 1 else math.nan
        delta = value - base
        rows.append({
            "layer": int(ly), "head": int(h), "method": meth, "metric": met, "value": value,
            "baseline": base, "delta": delta, "delta_sd": sd,
            "delta_se": sd / math.sqrt(len(per)) if len(per) > 1 else math.nan, "n": n,
            "effect": -delta if m.higher_is_better else delta,
            "lo": float(res.lo[i, j]), "hi": float(res.hi[i, j]),
            "status": str(res.status[i, j]), "in_top_k": bool(res.selected[i, j]),
            "n_needed": int(res.n_needed[i, j]), "key": float(res.key[i, j]),
        })  # fmt: skip
    out = pd.DataFrame(rows, columns=SEARCH_COLUMNS)
    out = out.sort_values(["method", "metric", "layer", "head"], kind="stable")
    return out.reset_index(drop=True).astype({"layer": "int64", "head": "int64", "n": "int64"})


def _summary(
    table: pd.DataFrame,
    results: dict[str, RaceResult],
    metrics: list[str],
    rule: RaceRule,
    n_examples: int,
    index: list[Head],
) -> dict[str, dict[str, object]]:
    out: dict[str, dict[str, object]] = {}
    ranked = ranking(table)
    for meth, res in results.items():
        for j, met in enumerate(metrics):
            g = ranked[(ranked.method == meth) & (ranked.metric == met)]
            und, top = g[g.status == "undecided"], g[g.in_top_k]
            out[f"{meth}/{met}"] = {
                "guaranteed": bool(res.guaranteed[j]),
                "statistical": bool(res.statistical[j]),
                "top": [[int(r.layer), int(r.head), float(r.delta)] for r in top.itertuples()],
                "undecided": [
                    [int(r.layer), int(r.head), int(r.n), int(r.n_needed)] for r in und.itertuples()
                ],
                "rounds": [list(x) for x in res.rounds],
                "range_factors": {str(n): f[j] for n, f in res.factors.items() if n < n_examples},
                "evaluations": res.evaluations,
            }
    return out


def top_k(
    model: nn.Module,
    batch: Batch,
    *,
    k: int,
    methods: Sequence[str | Intervention] = ("zero",),
    metrics: Sequence[str | Metric] = ("ce",),
    confidence: float = 0.95,
    direction: str = "abs",
    stats: StatsSource | None = None,
    heads: Sequence[Head] | None = None,
    counterfactual: Batch | None = None,
    batch_size: int = 8,
    layout: Layout | None = None,
    seed: int = 0,
    first: int = 4,
    range_factor: float = 1.0,
    leaders: int | None = None,
    max_cost: float | None = None,
    on_forward: Callable[[int], None] | None = None,
) -> TopKSearch:
    """The ``k`` heads with the largest exact sweep effect under each method and metric, with
    far fewer forward passes than the sweep, right with probability ``>= confidence``.

    Heads are evaluated exactly (the sweep's engine) on growing, seeded-random, nested sets of
    the examples; a head stops once an interval shows it cannot enter, or cannot leave, the top
    ``k``. Heads evaluated on every example have exactly the sweep's numbers. The rule and its one
    assumption (a head's per-example changes span at most ``range_factor`` times what its sample
    shows) are in :mod:`headlab.analyses.topk.race` and ``docs/topk.md``.

    Args:
        model, batch: the model and its evaluation examples (the population).
        k: heads wanted per method and metric.
        methods, metrics, stats, heads, counterfactual, batch_size: as in
            :func:`headlab.analyses.sweep.sweep`.
        confidence: probability that the whole answer (every method and metric) is right.
        direction: ``abs`` (|delta|), ``hurts`` (the sweep's effect, descending) or ``helps``.
        seed: seed of the example order.
        first, range_factor, leaders, max_cost: see :class:`RaceRule`.
        on_forward: progress callback, called with the examples of each forward.
    """
    layout = layout if layout is not None else describe(model)
    batches = {} if counterfactual is None else {COUNTERFACTUAL: counterfactual}
    ctx = Context(model, layout, batch, stats, batch_size, batches)
    rule = RaceRule(
        k=k, confidence=confidence, direction=direction, first=first,
        range_factor=range_factor, leaders=leaders, max_cost=max_cost, seed=seed,
    )  # fmt: skip
    return search(
        layout, len(batch), max(batch.seq_len, 1), methods=methods, metrics=metrics, rule=rule,
        run_parts=lambda parts: [p.run(ctx, on_forward) for p in parts], heads=heads,
    )  # fmt: skip
