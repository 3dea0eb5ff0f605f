"""Iterative removal with re-ranking (backup heads), and the off-target cost of removing heads.

:func:`cascade_steps` removes heads one at a time in importance order, re-ranking after every
removal. Round ``t`` starts from the set ``S_t`` of heads removed so far and scores every remaining
candidate ``h`` ablated together with ``S_t``; ``effect`` is the extra harm of ``h`` on top of
``S_t`` (``value - baseline``, oriented so positive = worse, where ``baseline`` is the metric
under ``S_t`` alone). The head with the largest effect is removed next. Round 0 is an ordinary
single-head sweep. Each round is a part (:class:`CascadePart`, key ``cascade-step###``) that
holds the heads removed before it, so a job runs the rounds one after the other.

A **backup head** (:func:`backup_heads`) is one whose effect rises sharply once another head is
removed: between rounds ``t - 1`` and ``t`` its effect grows by at least ``share`` of the
triggering head's own effect and to at least ``ratio`` times its earlier effect. The triggering
head is the one removed between the two rounds.

:func:`off_target` measures what removing heads chosen on one task does to other tasks and to
corpus cross-entropy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from torch import nn

from headlab.batch import Batch
from headlab.engine import run_plans
from headlab.errors import ConfigError
from headlab.heads import Head
from headlab.interventions import Intervention, Plan, StatsSource, intervention_from_name
from headlab.metrics import Metric, get_metric
from headlab.models.layout import Layout, describe
from headlab.parts import Context, OnForward, Part

__all__ = [
    "COLUMNS",
    "CascadePart",
    "CascadeStep",
    "backup_heads",
    "cascade",
    "cascade_candidates",
    "cascade_steps",
    "off_target",
    "part_key",
    "removed_heads",
]

COLUMNS = [
    "step",
    "n_removed",
    "layer",
    "head",
    "method",
    "metric",
    "value",
    "baseline",
    "clean",
    "delta",
    "effect",
    "removed",
]


def part_key(step: int) -> str:
    return f"cascade-step{step:03d}"


@dataclass(frozen=True)
class CascadeStep:
    """One round's outcome: every remaining candidate scored on top of the heads removed so far,
    and the head it removed."""

    step: int
    removed_head: Head
    table: pd.DataFrame

    @property
    def key(self) -> str:
        return part_key(self.step)


@dataclass(frozen=True)
class CascadePart(Part):
    """Round ``step`` of a cascade (key ``cascade-step###``): every candidate not in ``removed``
    (the heads removed by the earlier rounds, in order) ablated together with ``removed``. Each
    round needs the one before it, so a job runs them one after the other."""

    step: int
    method: str
    intervention: Intervention
    metric: str | Metric
    candidates: tuple[Head, ...]
    removed: tuple[Head, ...] = ()

    @property
    def key(self) -> str:
        return part_key(self.step)

    def cost(self, ctx: Context) -> int:
        plans = 1 + len(self.candidates) - len(self.removed) + (1 if self.removed else 0)
        return plans * len(ctx.batch)

    def run(self, ctx: Context, on_forward: OnForward | None = None) -> pd.DataFrame:
        m, iv, gone = get_metric(self.metric), self.intervention, list(self.removed)
        sign = -1.0 if m.higher_is_better else 1.0

        def score(plans: list[Plan]) -> list[float]:
            out = run_plans(
                ctx.model, ctx.batch, plans, [m], stats=ctx.stats, batch_size=ctx.batch_size,
                layout=ctx.layout, on_forward=on_forward, cache=ctx.cache,
            )  # fmt: skip
            return [s[m.name].mean for s in out]

        clean = score([Plan()])[0]
        base = score([Plan.heads(gone, iv)])[0] if gone else clean
        remaining = [h for h in self.candidates if h not in gone]
        values = score([Plan.heads([*gone, h], iv) for h in remaining])
        effects = [sign * (v - base) for v in values]
        pick = max(
            range(len(remaining)), key=lambda i: (effects[i], -remaining[i][0], -remaining[i][1])
        )
        rows = [
            [self.step, len(gone), ly, h, self.method, m.name, v, base, clean, v - base, e,
             i == pick]
            for i, ((ly, h), v, e) in enumerate(zip(remaining, values, effects, strict=True))
        ]  # fmt: skip
        return pd.DataFrame(rows, columns=COLUMNS)


def cascade_candidates(
    layout: Layout, heads: Sequence[Head] | None, steps: int
) -> tuple[Head, ...]:
    """The candidates of a cascade of ``steps`` rounds (default: every head), checked."""
    pool = [tuple(h) for h in heads] if heads is not None else layout.heads()
    for ly, h in pool:
        layout.check_head(ly, h)
    if len(set(pool)) != len(pool):
        raise ConfigError("cascade candidates repeat a head; give each (layer, head) once")
    if not 1 <= steps <= len(pool):
        raise ConfigError(
            f"steps must be in 1..{len(pool)} (the number of candidates), got {steps}"
        )
    return tuple(pool)


def cascade_steps(
    model: nn.Module,
    batch: Batch,
    *,
    method: str | Intervention = "zero",
    metric: str | Metric = "ce",
    steps: int = 4,
    heads: Sequence[Head] | None = None,
    stats: StatsSource | None = None,
    removed: Sequence[Head] = (),
    batch_size: int = 8,
    on_forward: Callable[[int], None] | None = None,
    layout: Layout | None = None,
) -> Iterator[CascadeStep]:
    """Yield rounds ``len(removed) .. steps - 1`` of the cascade (see the module docstring).

    Args:
        method: the ablation applied to every removed head and candidate.
        metric: what ``effect`` measures (one metric).
        steps: rounds to run (each removes one head); at most the number of candidates.
        heads: the candidates (default: every head).
        removed: heads already removed by earlier rounds, in order (to resume a cascade).
    """
    layout = layout if layout is not None else describe(model)
    iv = intervention_from_name(method) if isinstance(method, str) else method
    name = method if isinstance(method, str) else iv.label
    get_metric(metric)
    pool = cascade_candidates(layout, heads, steps)
    if iv.needs is not None and stats is None:
        raise ConfigError(f"method {name!r} needs activation statistics; pass stats=...")
    gone = [tuple(h) for h in removed]
    if any(h not in pool for h in gone):
        raise ConfigError("the removed heads to resume from are not all among the candidates")
    ctx = Context(model, layout, batch, stats, batch_size)  # one clean pass for every round
    for step in range(len(gone), steps):
        table = CascadePart(step, name, iv, metric, pool, tuple(gone)).run(ctx, on_forward)
        gone.append(removed_heads(table)[0])
        yield CascadeStep(step, gone[-1], table)


def cascade(model: nn.Module, batch: Batch, **kwargs: object) -> pd.DataFrame:
    """Every round of :func:`cascade_steps` as one tidy table."""
    parts = [s.table for s in cascade_steps(model, batch, **kwargs)]
    return pd.concat(parts, ignore_index=True)


def removed_heads(table: pd.DataFrame) -> list[Head]:
    """The heads removed, in order."""
    rows = table[table["removed"]].sort_values("step")
    return [(int(r.layer), int(r.head)) for r in rows.itertuples()]


def backup_heads(table: pd.DataFrame, *, share: float = 0.25, ratio: float = 2.0) -> pd.DataFrame:
    """Heads whose effect rose sharply after another head was removed (see the module docstring).

    Returns one row per flagged ``(step, head)`` with the trigger, the effects before and after,
    the rise, and ``share`` = rise / the trigger's own effect when it was removed.
    """
    if not (share > 0 and ratio >= 1):
        raise ConfigError(f"need share > 0 and ratio >= 1, got share={share}, ratio={ratio}")
    cols = ["step", "layer", "head", "trigger_layer", "trigger_head", "effect_before",
            "effect_after", "rise", "trigger_effect", "share"]  # fmt: skip
    out = []
    by_step = {s: g.set_index(["layer", "head"]).sort_index() for s, g in table.groupby("step")}
    for step in sorted(by_step)[1:]:
        prev, cur = by_step.get(step - 1), by_step[step]
        if prev is None:
            continue
        trig = prev[prev["removed"]]
        (tl, th), t_eff = trig.index[0], float(trig["effect"].iloc[0])
        both = cur.index.intersection(prev.index)
        before, after = prev.loc[both, "effect"], cur.loc[both, "effect"]
        rise = after - before
        floor = max(t_eff, 0.0) * share
        hit = (rise >= floor) & (rise > 0) & (after >= ratio * before.clip(lower=0))
        for (ly, h), flag in hit.items():
            if flag:
                r = float(rise[(ly, h)])
                out.append([step, ly, h, tl, th, float(before[(ly, h)]), float(after[(ly, h)]), r,
                            t_eff, r / t_eff if t_eff > 0 else np.nan])  # fmt: skip
    return pd.DataFrame(out, columns=cols)


def off_target(
    model: nn.Module,
    selections: Mapping[str, Sequence[Head]],
    targets: Mapping[str, tuple[Batch, str | Metric]],
    *,
    method: str | Intervention = "zero",
    stats: StatsSource | None = None,
    batch_size: int = 8,
    layout: Layout | None = None,
) -> pd.DataFrame:
    """Ablate each selection of heads (e.g. chosen on one task) and score every target.

    Args:
        selections: ``{name: heads}``, e.g. ``{"induction": [...], "random": [...]}``.
        targets: ``{name: (batch, metric)}``, e.g. the tasks and a corpus with ``"ce"``.
        method: the ablation (statistics, if it needs them, are shared by every target).

    Returns one row per ``(selected_on, target)``: ``n_heads, metric, value, baseline, delta,
    effect`` (positive = the selection hurts the target).
    """
    layout = layout if layout is not None else describe(model)
    iv = intervention_from_name(method) if isinstance(method, str) else method
    if not selections or not targets:
        raise ConfigError("off_target needs at least one selection of heads and one target")
    names = list(selections)
    plans = [Plan.heads(list(selections[n]), iv) if selections[n] else Plan() for n in names]
    rows = []
    for target, (tbatch, metric) in targets.items():
        m = get_metric(metric)
        res = run_plans(
            model, tbatch, [Plan(), *plans], [m], stats=stats, batch_size=batch_size, layout=layout
        )
        base = res[0][m.name].mean
        for n, r in zip(names, res[1:], strict=True):
            v = r[m.name].mean
            d = v - base
            rows.append([n, target, len(selections[n]), m.name, v, base, d,
                         -d if m.higher_is_better else d])  # fmt: skip
    cols = ["selected_on", "target", "n_heads", "metric", "value", "baseline", "delta", "effect"]
    return pd.DataFrame(rows, columns=cols)
