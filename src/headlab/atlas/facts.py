"""What the runs hold about each head, read into two shapes every kind of run shares.

- :class:`HeadMap`: one layer x head quantity of one run (a sweep's Δce under zero ablation, a
  detector's score, a CHG gate ...): a tidy table ``layer, head, value, lo, hi, n, rank, text``.
  Each becomes a heatmap and a row of every head's card.
- notes: one sentence about one head (its CHG label, the cascade round that removed it, the
  heads it backs up, whether steering selected it ...): rows ``layer, head, run, group, text,
  tag``, where ``tag`` is a few words for the ranking table (empty: nothing worth a tag).

:func:`read_run` dispatches on the run's kind (one reader per command below) and also returns the
run's clean metrics for the overview. Column names are the jobs' own (``delta``, ``delta_se``,
``n``, ``effect``, ``rank`` ...).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from headlab.analyses.sweep import rank_heads
from headlab.atlas.rundirs import RunView

__all__ = ["MAP_COLUMNS", "Found", "HeadMap", "read_run", "t_interval"]

MAP_COLUMNS = ["layer", "head", "value", "lo", "hi", "n", "rank", "text"]


@dataclass
class HeadMap:
    """One layer x head quantity of one run.

    Attributes:
        run: the run's label.
        group: the section of the head card it belongs to (``sweep``, ``estimate`` ...).
        name: the condition, e.g. ``zero / ce``.
        quantity: what ``value`` is, e.g. ``Δce``.
        table: ``MAP_COLUMNS`` rows; ``lo``/``hi`` the 95 % interval where the run has one,
            ``rank`` 1 = the most important head by the run's own ordering.
        diverging: centred at zero (effects) rather than a score's range.
    """

    run: str
    group: str
    name: str
    quantity: str
    table: pd.DataFrame
    diverging: bool = True

    @property
    def has_interval(self) -> bool:
        return bool(np.isfinite(self.table["lo"].to_numpy(dtype=float)).any())


@dataclass
class Found:
    """What one run holds: its maps, notes about heads, and clean metrics."""

    maps: list[HeadMap] = field(default_factory=list)
    notes: list[dict[str, object]] = field(default_factory=list)
    clean: dict[str, float] = field(default_factory=dict)

    def note(
        self, run: RunView, group: str, layer: int, head: int, text: str, tag: str = ""
    ) -> None:
        self.notes.append({"layer": int(layer), "head": int(head), "run": run.label,
                           "group": group, "text": text, "tag": tag})  # fmt: skip


def t_interval(delta: np.ndarray, se: np.ndarray, n: np.ndarray, level: float = 0.95):
    """``(lo, hi)``: Student's t interval ``delta ± t_{(1+level)/2, n-1} se`` of a mean over ``n``
    examples (NaN where ``n < 2``). With the 4 to 8 examples a sweep usually has, the normal
    quantile 1.96 would be too narrow (t is 3.18 at n = 4)."""
    from scipy.special import stdtrit  # Student's t quantile (scipy.stats costs seconds to import)

    delta, se, n = (np.asarray(x, dtype=float) for x in (delta, se, n))
    with np.errstate(invalid="ignore"):
        q = np.where(n >= 2, stdtrit(np.maximum(n - 1, 1), (1 + level) / 2), np.nan)
    return delta - q * se, delta + q * se


def _map_table(
    sub: pd.DataFrame, value: str, *, rank: pd.Series | None = None, ci: bool = False,
    text: pd.Series | None = None,
) -> pd.DataFrame:  # fmt: skip
    """``MAP_COLUMNS`` from ``sub`` (one row per head): ``value`` column, the t interval of
    ``delta`` when ``ci``, ``rank`` (default: by ``value``, largest first)."""
    out = pd.DataFrame(
        {"layer": sub["layer"].astype(int).to_numpy(), "head": sub["head"].astype(int).to_numpy()}
    )
    out["value"] = sub[value].astype(float).to_numpy()
    if ci and {"delta_se", "n"} <= set(sub.columns):
        lo, hi = t_interval(sub[value], sub["delta_se"], sub["n"])
        out["lo"], out["hi"] = lo, hi
    else:
        out["lo"] = out["hi"] = math.nan
    out["n"] = sub["n"].to_numpy() if "n" in sub.columns else np.nan
    if rank is None:
        rank = out["value"].rank(ascending=False, method="first")
    out["rank"] = np.asarray(rank, dtype=float)
    out["text"] = "" if text is None else np.asarray(text, dtype=object)
    return out[MAP_COLUMNS]


def _effect_maps(run: RunView, table: pd.DataFrame, group: str) -> list[HeadMap]:
    """One map of ``delta`` (with its t interval, ranked by ``effect``) per (method, metric) of a
    sweep-shaped table; rows without a baseline (gradient, rollout scores) show ``value``."""
    maps = []
    ranked = rank_heads(table)
    order = [str(m) for m in run.identity.get("methods", []) or []]  # as the command listed them
    groups = sorted(
        ranked.groupby(["method", "metric"], sort=False),
        key=lambda item: order.index(item[0][0]) if item[0][0] in order else len(order),
    )
    for (method, metric), g in groups:
        g = g.sort_values(["layer", "head"])
        score = g["baseline"].isna().all()
        tab = _map_table(g, "value" if score else "delta", rank=g["rank"], ci=not score)
        maps.append(
            HeadMap(run.label, group, f"{method} / {metric}",
                    f"{method} score" if score else f"Δ{metric}", tab, diverging=not score)
        )  # fmt: skip
    return maps


def _baselines(table: pd.DataFrame | None, found: Found, prefix: str = "") -> None:
    if table is None or not {"metric", "baseline"} <= set(table.columns):
        return
    for metric, g in table.dropna(subset=["baseline"]).groupby("metric", sort=False):
        found.clean[f"{prefix}{metric}"] = float(g["baseline"].iloc[0])


# -- one reader per kind of run ----------------------------------------------------------------
def _sweep(run: RunView, found: Found) -> None:
    table = run.table("results.parquet")
    if table is None and not run.complete:
        table = run.sweep_parts()
    if table is None:
        return
    found.maps += _effect_maps(run, table, "sweep")
    _baselines(table, found)


def _ranking_sweep(run: RunView, found: Found) -> None:
    """The sweep a prune or shift run ran itself to rank heads (parts ``sweep-*``)."""
    table = run.sweep_parts("sweep-")
    if table is not None:
        found.maps += _effect_maps(run, table, "ranking sweep")
        _baselines(table, found)


def _estimate(run: RunView, found: Found) -> None:
    table = run.table("estimates.parquet")
    if table is not None:
        found.maps += _effect_maps(run, table, "estimate")
        _baselines(table, found)
    exact = run.table("exact.parquet")
    for r in (exact if exact is not None else pd.DataFrame()).itertuples():
        text = f"exact {r.method} ablation, {r.metric}: Δ = {r.delta:+.6g} (n = {r.n})"
        found.note(run, "exact check", r.layer, r.head, text)


def _prune(run: RunView, found: Found) -> None:
    _ranking_sweep(run, found)
    summary = run.table("summary.csv")
    if summary is not None:
        _baselines(summary[summary["fraction"] == 0], found)


def _cascade(run: RunView, found: Found) -> None:
    table = run.table("results.parquet")
    if table is None and not run.complete:
        table = run.parts("cascade-")
    if table is None:
        return
    first = table[table["step"] == table["step"].min()].sort_values(["layer", "head"])
    method, metric = first["method"].iloc[0], first["metric"].iloc[0]
    rank = first["effect"].rank(ascending=False, method="first")
    found.maps.append(
        HeadMap(run.label, "cascade", f"{method} / {metric}, round 0", f"effect on {metric}",
                _map_table(first, "effect", rank=rank))
    )  # fmt: skip
    for (ly, h), g in table.sort_values("step").groupby(["layer", "head"]):
        effects = ", ".join(f"{e:+.4g}" for e in g["effect"])
        gone = g[g["removed"]]
        text, tag = f"effect by round: {effects}", ""
        if len(gone):
            tag = f"removed in cascade round {int(gone['step'].iloc[0])}"
            text += f"; {tag}"
        found.note(run, "cascade", ly, h, text, tag)
    backups = run.table("backups.csv")
    for r in (backups if backups is not None else pd.DataFrame()).itertuples():
        trigger = f"L{int(r.trigger_layer)}.H{int(r.trigger_head)}"
        text = (f"backup: effect rose {r.effect_before:+.4g} → {r.effect_after:+.4g} after "
                f"{trigger} was removed (round {int(r.step)})")  # fmt: skip
        found.note(run, "cascade", r.layer, r.head, text, f"backup of {trigger}")
        found.note(run, "cascade", r.trigger_layer, r.trigger_head,
                   f"removing it raised L{int(r.layer)}.H{int(r.head)} by {r.rise:+.4g} "
                   f"(a backup, round {int(r.step)})")  # fmt: skip
    if "clean" in table.columns:
        found.clean[str(metric)] = float(table["clean"].iloc[0])


def _shift(run: RunView, found: Found) -> None:
    _ranking_sweep(run, found)
    table = run.table("results.parquet")
    if table is None:
        return
    alone = table[(table["n_heads"] == 1) & table["metric"].isin(["kl", "ce"])]
    for (method, ly, h), g in alone.groupby(["method", "layer", "head"], sort=True):
        values = ", ".join(
            f"{'output KL' if m == 'kl' else 'Δ' + m} {v:.4g}"
            for m, v in zip(g["metric"], g["delta"], strict=True)
        )
        found.note(run, "shift", ly, h, f"{method} ablation alone: {values}")
    for h in run.manifest.get("heads", []) or []:
        found.note(run, "shift", h[0], h[1], "in the set the shift run ablated together")
    _baselines(table[table["metric"] == "ce"], found)


def _detect(run: RunView, found: Found) -> None:
    table = run.table("results.parquet")
    if table is None:
        return
    for metric, g in table.groupby("metric", sort=False):
        g = g.sort_values(["layer", "head"])
        found.maps.append(
            HeadMap(run.label, "detector", str(metric), "score", _map_table(g, "value"),
                    diverging=False)
        )  # fmt: skip


def _compare(run: RunView, found: Found) -> None:
    scores = run.table("scores.parquet")
    if scores is None:
        return
    for (measure, metric), g in scores.groupby(["measure", "metric"], sort=False):
        g = g.sort_values(["layer", "head"])
        found.maps.append(
            HeadMap(run.label, "compare", f"{measure} / {metric}", "|importance|",
                    _map_table(g, "value", rank=g["rank"]), diverging=False)
        )  # fmt: skip


def _gate(run: RunView, found: Found) -> None:
    table = run.table("heads.parquet")
    if table is None:
        return
    table = table.sort_values(["layer", "head"])
    if "g_plus" in table.columns:  # CHG
        text = table["label"].astype(str)
        for col, name in (("g_plus", "G+ (keep)"), ("g_minus", "G- (remove)"), ("g_zero", "G0")):
            tab = _map_table(table, col, text=text)
            tab["n"] = table["n_masks"].to_numpy()
            found.maps.append(HeadMap(run.label, "CHG gate", name, "gate", tab, diverging=False))
        for r in table.itertuples():
            found.note(run, "CHG", r.layer, r.head,
                       f"CHG label: {r.label} (facilitating {r.facilitating:.3f}, interfering "
                       f"{r.interfering:.3f}, irrelevant {r.irrelevant:.3f}; agreement "
                       f"{r.agreement:.2f} over {r.n_masks} masks)",
                       "" if r.label == "irrelevant" else f"CHG {r.label}")  # fmt: skip
        summary = run.table("summary.csv")
        if summary is not None:
            for r in summary[summary["gates"] == "clean"].itertuples():
                found.clean[f"nll ({r.split})"] = float(r.nll)
    else:  # contrastive
        tab = _map_table(table, "g", text=table["role"].astype(str))
        found.maps.append(HeadMap(run.label, "contrastive gate", "g", "gate", tab, diverging=False))
        for r in table.itertuples():
            found.note(run, "contrastive gate", r.layer, r.head,
                       f"role: {r.role} (gate {r.g:.3f} ± {r.g_sd:.3f})",
                       "" if r.role == "kept" else str(r.role))  # fmt: skip


def _l0(run: RunView, found: Found) -> None:
    table = run.table("heads.parquet")
    if table is None:
        return
    for lam, g in table.groupby("lam", sort=True):
        g = g.sort_values(["layer", "head"])
        text = np.where(g["kept"], "kept", "pruned")
        found.maps.append(
            HeadMap(run.label, "L0 gate", f"λ = {lam:g}", "gate",
                    _map_table(g, "gate", text=text), diverging=False)
        )  # fmt: skip
        for r in g.itertuples():
            found.note(run, "L0", r.layer, r.head,
                       f"λ = {lam:g}: {'kept' if r.kept else 'pruned'} (gate {r.gate:.3f}, "
                       f"log α {r.log_alpha:+.3f})",
                       "" if r.kept else f"L0 pruned at λ = {lam:g}")  # fmt: skip
    tradeoff = run.table("tradeoff.parquet")
    if tradeoff is not None:
        _baselines(tradeoff, found)


def _steer(run: RunView, found: Found) -> None:
    for name, group in (("heads.csv", "steer selection"), ("heads_sweep.csv", "steer sweep")):
        table = run.table(name)
        if table is None:
            continue
        table = table.sort_values(["layer", "head"])
        metric = str(table["metric"].iloc[0]) if "metric" in table.columns else "score"
        rank = table["rank"] if "rank" in table.columns else None
        found.maps.append(
            HeadMap(run.label, group, metric, "score", _map_table(table, "value", rank=rank),
                    diverging=False)
        )  # fmt: skip
    for h in run.manifest.get("heads", []) or []:
        found.note(run, "steer", h[0], h[1], "selected for steering", "steering")
    for seed, heads in (run.manifest.get("random", {}) or {}).items():
        for h in heads:
            found.note(run, "steer", h[0], h[1], f"in the random control set of seed {seed}")
    table = run.table("results.parquet")
    if table is not None:
        for r in table[table["selection"] == "clean"].itertuples():
            found.clean[f"{r.target} {r.metric}"] = float(r.value)


def _attention(run: RunView, found: Found) -> None:
    table = run.table("results.parquet")
    if table is None:
        return
    table = table.sort_values(["layer", "head"])
    keys = str(table["keys"].iloc[0])
    method, metric = table["method"].iloc[0], table["metric"].iloc[0]
    found.maps.append(
        HeadMap(run.label, "attention", f"mass on {keys} keys", "attention mass",
                _map_table(table, "plausibility", rank=table["plausibility_rank"]),
                diverging=False)
    )  # fmt: skip
    tab = _map_table(table, "effect", rank=table["faithfulness_rank"])
    found.maps.append(
        HeadMap(run.label, "attention", f"{method} / {metric} effect", f"Δ{metric}", tab)
    )
    for r in table.itertuples():
        found.note(run, "attention vs effect", r.layer, r.head,
                   f"attention-mass rank {r.plausibility_rank}, |effect| rank "
                   f"{r.faithfulness_rank} of {len(table)}")  # fmt: skip
    _baselines(table, found)


READERS: dict[str, Callable[[RunView, Found], None]] = {
    "sweep": _sweep,
    "estimate": _estimate,
    "prune": _prune,
    "cascade": _cascade,
    "shift": _shift,
    "detect": _detect,
    "compare": _compare,
    "gate": _gate,
    "gate-contrast": _gate,
    "l0": _l0,
    "steer": _steer,
    "attention": _attention,
}


def read_run(run: RunView) -> Found:
    """The maps, notes and clean metrics of ``run`` (empty for a kind the atlas does not know,
    which is noted)."""
    found = Found()
    reader = READERS.get(run.kind)
    if reader is None:
        run.notes.append(f"the atlas does not read {run.kind!r} runs; only the overview is shown")
        return found
    try:
        reader(run, found)
    except (KeyError, AttributeError, IndexError, ValueError) as err:  # a table of another release
        run.notes.append(f"its tables could not be read as a {run.kind} run's ({err!r})")
    return found
