"""The generated blocks of ``docs/findings.md``: one renderer per section, each reading its runs
under ``RUNS`` and returning the block's markdown and the verdicts of its claims (``None`` while a
run it needs is missing). Used by ``scripts/findings.py``; the rule is in ``findings_rule.py``."""

from __future__ import annotations

import itertools
import json
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import findings_steer
import numpy as np
import pandas as pd
from findings_rule import (
    Claim,
    bootstrap_interval,
    combine,
    mean_interval,
    t_interval,
    vs_random_interval,
)

RUNS = Path(__file__).resolve().parents[1] / "runs" / "findings"


@dataclass
class Verdict:
    """One claim's verdict for the summary table: ``key`` matches ``findings.PREVIOUS``."""

    key: str
    verdict: str
    numbers: str


@dataclass
class Rendered:
    body: str
    verdicts: list[Verdict] = field(default_factory=list)


# --- reading runs ------------------------------------------------------------------------------


def read(name: str, file: str = "results.parquet") -> pd.DataFrame | None:
    path = RUNS / name / file
    if not path.is_file():
        return None
    return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)


def check(name: str) -> pd.DataFrame | None:
    """A per-example check computed by ``findings.py`` (``RUNS/checks/NAME.parquet``)."""
    path = RUNS / "checks" / f"{name}.parquet"
    return pd.read_parquet(path) if path.is_file() else None


def command(name: str) -> str:
    """The run's command as recorded in its manifest, with ``--out`` at its canonical place."""
    manifest = json.loads((RUNS / name / "manifest.json").read_text())
    cmd = [c for c in manifest.get("command", []) if c != "--quiet"]
    if cmd and cmd[0] != "headlab":
        cmd[0] = "headlab"
    if "--out" in cmd:  # the canonical place, also for a run copied in from elsewhere
        cmd[cmd.index("--out") + 1] = f"runs/findings/{name}"
    return "`" + shlex.join(cmd) + "`"


def figure(run_file: str, name: str, alt: str) -> str:
    """The markdown of ``docs/figures/NAME`` (copied from ``RUNS/RUN_FILE``), empty while that run
    has not written it: a section shows only figures of the runs it reports."""
    return f"![{alt}](figures/{name})\n\n" if (RUNS / run_file).is_file() else ""


def table(header: list[str], rows: list[list[object]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(out)


def s(x: float, digits: int = 2) -> str:
    return f"{x:+.{digits}f}".replace("-", "−")


def head(r: object) -> str:
    return f"L{int(r.layer)}.H{int(r.head)}"


# --- single-head importance (from compare's per-example exact zero ablation) -------------------


def _zero_ablation(name: str = "compare") -> tuple[np.ndarray, np.ndarray, pd.DataFrame] | None:
    """``values [example, head]`` (per-example ΔCE of zero-ablating each head alone), ``weights
    [example]`` (scored tokens) and the ``layer, head`` index of the columns."""
    from headlab.analyses.compare.stats import _arrays

    per = read(name, "per_example.parquet")
    if per is None:
        return None
    per = per[per["measure"] == "ablation:zero"]
    arrays, heads = _arrays(per)
    a = arrays["ablation:zero"]
    return a.values, a.weights, heads


def _concentration(values: np.ndarray, weights: np.ndarray, counts: np.ndarray,
                   top: int = 10, tail: int = 100) -> tuple[float, float]:  # fmt: skip
    """(share of the ``top`` largest positive mean effects in all positive effect, log-log slope
    of the ``tail`` largest positive effects against rank) for example weights ``counts``."""
    cw = counts * weights
    d = cw @ values / cw.sum()  # [head]
    pos = np.sort(d[d > 0])[::-1]
    if len(pos) < 3:
        return np.nan, np.nan
    n = min(tail, len(pos))
    slope = np.polyfit(np.log(np.arange(1, n + 1)), np.log(pos[:n]), 1)[0]
    return float(pos[:top].sum() / pos.sum()), float(slope)


def render_sweep() -> Rendered | None:
    z = _zero_ablation()
    if z is None:
        return None
    values, weights, heads = z
    d = weights @ values / weights.sum()
    order = np.argsort(-d)
    best = ", ".join(f"L{heads.layer[i]}.H{heads['head'][i]} {s(d[i])}" for i in order[:5])
    share = bootstrap_interval(lambda c: _concentration(values, weights, c)[0], len(weights))
    slope = bootstrap_interval(lambda c: _concentration(values, weights, c)[1], len(weights))
    rep = f"bootstrap over {len(weights)} examples"
    c1 = Claim("share of the top 10 in the total positive effect", share, 0.3, ">", replicates=rep)
    c2 = Claim("log-log slope of the top 100 positive effects", slope, -0.5, "<", replicates=rep)
    v = combine([c1.verdict, c2.verdict])
    body = (
        f"{command('compare')} (its exact zero ablation of every head, per example, is a sweep "
        f"with per-example values): of {len(d)} heads, {(np.abs(d) < 0.01).sum()} "
        f"({(np.abs(d) < 0.01).mean():.0%}) change CE by less than 0.01 nats when zero-ablated "
        f"alone and {(d < 0).sum()} ({(d < 0).mean():.0%}) lower it. Largest: {best}, …\n\n"
        f"{claims_table([c1, c2])}\n\n"
        f'Verdict on "importance is concentrated / power-law": **{v}**.'
    )
    nums = f"top-10 share {c1.interval()}, slope {c2.interval()}"
    return Rendered(body, [Verdict("sweep", v, nums)])


# --- pruning curves ----------------------------------------------------------------------------


def _curve(t: pd.DataFrame, order: str, method: str, metric: str = "ce") -> pd.DataFrame:
    """``[seed, fraction]`` table of the harm (``effect``: the metric's change, oriented so that
    larger is worse; ΔCE for CE) for one (order, method)."""
    r = t[(t["order"] == order) & (t["method"] == method) & (t["metric"] == metric)]
    return r.pivot_table(index="seed", columns="fraction", values="effect")


def _seed_mean(t: pd.DataFrame, method: str, fractions: tuple[float, ...],
               metric: str = "ce") -> pd.Series:  # fmt: skip
    """Per seed of the random order: the harm averaged over ``fractions``."""
    c = _curve(t, "random", method, metric)
    cols = [f for f in c.columns if any(np.isclose(f, x) for x in fractions)]
    return c[cols].mean(axis=1)


def _harm(metric: str, t: pd.DataFrame | None = None) -> str:
    """The harm's label: ``ΔCE``, ``Δmetric``, or ``−Δmetric`` for a metric where higher is
    better (its ``effect`` is ``−delta``)."""
    if metric == "ce":
        return "ΔCE"
    if t is not None:
        r = t[(t["metric"] == metric) & (t["delta"] != 0)]
        if len(r) and (r["effect"] == -r["delta"]).all():
            return f"−Δ{metric}"
    return f"Δ{metric}"


def _primary(t: pd.DataFrame) -> str:
    """The metric the method claims are decided on: CE where the run has it, else its first."""
    metrics = list(dict.fromkeys(t["metric"]))
    return next((m for m in ("ce", "cls_ce") if m in metrics), metrics[0])


def binding(claims: list[Claim]) -> str:
    """The condition that decides a combined claim, with its interval: the first that disagrees,
    else the one whose interval comes closest to the wrong side of its threshold."""
    if not claims:
        return ""
    bad = [c for c in claims if c.verdict == "disagrees"]
    if bad:
        c = bad[0]
    else:

        def margin(c: Claim) -> float:  # how far the interval reaches toward the wrong side
            edge = c.high - c.threshold if c.side == "<" else c.threshold - c.low
            return edge if np.isfinite(edge) else np.inf

        c = max(claims, key=margin)
    return f"{c.what.split(', mean over')[0]} {c.interval()}"


def claims_table(claims: list[Claim]) -> str:
    """One row per claim: quantity, estimate [95 % CI], claim, verdict (replicates once below)."""
    rows = [[c.what, c.interval(), f"{c.side} {c.threshold:g}", f"**{c.verdict}**"]
            for c in claims]  # fmt: skip
    reps = sorted({c.replicates for c in claims if c.replicates})
    note = f"\n\nIntervals: {'; '.join(reps)}." if reps else ""
    return table(["quantity", "estimate [95 % CI]", "claim", "verdict"], rows) + note


def _method_claims(t: pd.DataFrame, peaks: tuple[str, ...], fractions: tuple[float, ...],
                   metric: str) -> tuple[list[Claim], str, str, list[Claim]]:  # fmt: skip
    """The claims "peak degrades least" (per peak estimator) and "resampling hurts most", as paired
    differences over seeds of the harm averaged over ``fractions``; returns the claims and the
    two verdicts, and the claims of the peak estimator that fares best."""
    methods = list(dict.fromkeys(t["method"]))
    avg = {m: _seed_mean(t, m, fractions, metric) for m in methods}
    n = len(next(iter(avg.values())))
    rep = f"t-interval over {n} random-order seeds, paired"
    frac = "/".join(f"{f:.0%}" for f in fractions)
    h = _harm(metric, t)
    lines, peak_v, groups = [], [], []
    for p in peaks:
        if p not in avg:
            continue
        cs = [Claim(f"{h}: {p} − {m}, mean over {frac}", t_interval(avg[p] - avg[m]), 0,
                    "<", replicates=rep) for m in methods if not m.startswith("peak")]  # fmt: skip
        lines += cs
        peak_v.append(combine([c.verdict for c in cs]))
        groups.append(cs)
    res = [Claim(f"{h}: resample − {m}, mean over {frac}",
                 t_interval(avg["resample"] - avg[m]), 0, ">", replicates=rep)
           for m in methods if m != "resample"] if "resample" in avg else []  # fmt: skip
    lines += res
    # the claim is about the peak: it agrees if some estimator of the peak degrades least, and
    # disagrees only if every estimator is beaten
    pv = (
        "agrees"
        if "agrees" in peak_v
        else "disagrees"
        if peak_v and all(v == "disagrees" for v in peak_v)
        else "inconclusive"
    )
    rank = {"agrees": 0, "inconclusive": 1, "disagrees": 2}
    best = min(zip(peak_v, groups, strict=True), key=lambda x: rank[x[0]])[1] if groups else []
    return lines, pv, combine([c.verdict for c in res]), best


def _method_table(t: pd.DataFrame, fractions: tuple[float, ...], metric: str) -> str:
    methods = list(dict.fromkeys(t["method"]))
    rows = []
    for f in fractions:
        row = [f"{f:g}"]
        for m in methods:
            c = _curve(t, "random", m, metric)
            col = [x for x in c.columns if np.isclose(x, f)]
            if not col:
                row.append("")
                continue
            v = c[col[0]]
            row.append(s(v.mean()) + (f" ± {v.std(ddof=1):.2f}" if len(v) > 1 else ""))
        rows.append(row)
    head = f"fraction: {_harm(metric, t)}, random order, mean ± sd over seeds"
    return table([head, *methods], rows)


def _method_section(name: str, unit: str, peaks: tuple[str, ...],
                    key: str | None = None) -> Rendered | None:  # fmt: skip
    """Methods on the same random masks: table, claims and verdicts (keys ``KEY-peak``,
    ``KEY-resample``; default ``KEY`` = ``unit``), on the run's first metric."""
    t = read(name)
    if t is None:
        return None
    metrics = list(dict.fromkeys(t["metric"]))
    metric = _primary(t)
    fractions = tuple(sorted(set(t["fraction"]) - {0.0}))
    use = tuple(f for f in (0.3, 0.5, 1.0) if any(np.isclose(f, x) for x in fractions))
    claims, peak_v, res_v, best_peak = _method_claims(t, peaks, use, metric)
    methods = list(dict.fromkeys(t["method"]))
    avg = {m: float(_seed_mean(t, m, use, metric).mean()) for m in methods}
    ranked = " < ".join(sorted(methods, key=avg.get))
    base = t[t["metric"] == metric]["baseline"].iloc[0]
    other = []
    for m2 in (m for m in metrics if m != metric):
        last = t[(t["metric"] == m2) & np.isclose(t["fraction"], 1.0)]
        drop = ", ".join(
            f"{m} {g['delta'].mean():+.3f}" for m, g in last.groupby("method", sort=False)
        )
        clean2 = t[t["metric"] == m2]["baseline"].iloc[0]
        other.append(f"{m2} (clean {clean2:.3f}) changes by {drop} at 100 %")
    body = "\n".join([
        command(name), "", _method_table(t, fractions, metric), "",
        f"Clean {metric} {base:.3f}. Averaged over {' / '.join(f'{f:.0%}' for f in use)}, the "
        f"methods rank {ranked} in {_harm(metric, t)}"
        + (f"; {'; '.join(other)}." if other else "."), "",
        claims_table(claims), "",
        f'"Peak ablation degrades least" ({unit}s): **{peak_v}**; "resampling hurts most": '
        f"**{res_v}**.",
    ])  # fmt: skip
    key = key or unit
    peak_cs = best_peak
    res_cs = [c for c in claims if c.what.split(": ")[1].startswith("resample")]
    return Rendered(body, [Verdict(f"{key}-peak", peak_v, f"{ranked}; {binding(peak_cs)}"),
                           Verdict(f"{key}-resample", res_v,
                                   f"{ranked}; {binding(res_cs)}")])  # fmt: skip


def render_prune_neurons() -> Rendered | None:
    r = _method_section("prune-neurons", "neuron", _PEAKS)
    if r is not None:
        r.body = figure("prune-neurons/prune.png", "prune_neurons.png", "prune neurons") + r.body
    return r


def _model_section(model: str, runs: tuple[tuple[str, str], ...]) -> Rendered | None:
    """The method comparison on another model: one :func:`_method_section` per (run, unit)."""
    parts = [(unit, _method_section(f"{model}-{run}", unit, _PEAKS, f"{model}-{unit}"))
             for run, unit in runs]  # fmt: skip
    have = [(u, r) for u, r in parts if r is not None]
    if not have:
        return None
    body = "\n\n".join(f"**{u}s**: {r.body}" for u, r in have)
    return Rendered(body, [v for _, r in have for v in r.verdicts])


_PEAKS = ("peak", "peak:hist", "peak:kde", "peak:kde:0.2")


def render_minilm() -> Rendered | None:
    return _model_section("minilm", (("prune-heads", "head"), ("prune-neurons", "neuron")))


def render_digits() -> Rendered | None:
    return _model_section("digits", (("prune-heads", "head"), ("prune-neurons", "neuron")))


def render_prune_heads() -> Rendered | None:
    """Importance order (ranked on other blocks) vs random order, and the removable fraction."""
    t, rem = read("prune-heads"), read("prune-heads", "removable.csv")
    if t is None or rem is None:
        return None
    rows = []
    for r in rem[rem["metric"] == "ce"].sort_values(["order", "method"]).itertuples():
        c = _curve(t, r.order, r.method)
        cells = []
        for f in (0.3, 0.5, 0.7, 1.0):
            col = [x for x in c.columns if np.isclose(x, f)]
            v = c[col[0]] if col else pd.Series(dtype=float)
            sd = f" ± {v.std(ddof=1):.2f}" if len(v) > 1 else ""
            cells.append(s(v.mean()) + sd if len(v) else "")
        rows.append([f"{r.order}, {r.method}", f"{r.fraction:g} ({int(r.n_pruned)} heads)", *cells])
    out = [figure("prune-heads/results.parquet", "prune_orders.png", "pruning orders")
           + command("prune-heads"), "",
           table(["order, method", "largest fraction with ΔCE ≤ 0.1",
                  "ΔCE at 30 %", "50 %", "70 %", "100 %"], rows)]  # fmt: skip
    # importance beats random: paired over random seeds (the importance curve is one curve)
    claims = []
    sweep = _curve(t, "sweep", "zero")
    rand = _curve(t, "random", "zero")
    n = len(rand)
    for f in (0.3, 0.5):
        col_s = [x for x in sweep.columns if np.isclose(x, f)]
        col_r = [x for x in rand.columns if np.isclose(x, f)]
        if col_s and col_r:
            diff = rand[col_r[0]] - float(sweep[col_s[0]].iloc[0])
            claims.append(Claim(f"ΔCE(random) − ΔCE(importance order), zero, {f:.0%} of heads",
                                t_interval(diff), 0, ">",
                                replicates=f"t-interval over {n} random seeds"))  # fmt: skip
    v_order = combine([c.verdict for c in claims])
    # 70–90 % removable: the importance-ordered ΔCE at 70 %, per-example interval if checked
    per_block = check("prune-heads-examples")
    v_rem, rem_claims = "inconclusive", []
    if per_block is not None:
        for m, g in per_block.groupby("method", sort=False):
            g = g[np.isclose(g["fraction"], 0.7)]
            est = t_interval(g["delta"].to_numpy())
            rem_claims.append(
                Claim(
                    f"ΔCE at 70 % of heads, importance order, {m}",
                    est,
                    0.1,
                    "<",
                    replicates=f"t-interval over {len(g)} evaluation blocks",
                )
            )
        v_rem = (
            "agrees"
            if any(c.verdict == "agrees" for c in rem_claims)
            else combine([c.verdict for c in rem_claims])
        )
    else:
        rem_claims.append(Claim("ΔCE at 70 % of heads, importance order, zero",
                                (float(sweep[next(x for x in sweep.columns if np.isclose(x, 0.7))]
                                       .iloc[0]), np.nan, np.nan), 0.1, "<",
                                replicates="one curve, no per-example check"))  # fmt: skip
    out += ["", claims_table(claims + rem_claims), "",
            f'"Importance order beats random order": **{v_order}**; "70–90 % of heads are '
            f'removable" (held-out ranking): **{v_rem}**.']  # fmt: skip
    best = rem[(rem["metric"] == "ce") & (rem["order"] == "sweep")]["fraction"].max()
    verdicts = [Verdict("order", v_order, claims[-1].interval() if claims else ""),
                Verdict("removable", v_rem, f"largest fraction within 0.1 nats {best:.0%}; "
                        + rem_claims[0].interval())]  # fmt: skip
    return Rendered("\n".join(out), verdicts)


def render_prune_head_methods() -> Rendered | None:
    return _method_section("prune-head-methods", "head", _PEAKS)


# --- distribution shift ------------------------------------------------------------------------


def render_shift() -> Rendered | None:
    t = read("shift")
    if t is None:
        return None
    rows, far = [], {}
    for m, g in t.groupby("method", sort=False):
        nr = g[g["metric"] == "norm_ratio"]
        k = nr.iloc[(nr["value"] - 1).abs().argmax()]
        s3 = g[g["metric"] == "frac_3sigma"].sort_values("at_layer").iloc[0]
        kl = g[g["metric"] == "kl"]["value"].iloc[0]
        ce = g[g["metric"] == "ce"]["delta"].iloc[0]
        far[m] = s3["value"] / max(s3["baseline"], 1e-12)
        rows.append([m, f"{k['value']:.2f} (layer {int(k['at_layer'])})",
                     f"{s3['value']:.1%} (clean {s3['baseline']:.1%})",
                     f"{kl:.2f}", s(ce)])  # fmt: skip
    rows.sort(key=lambda r: float(r[3]))
    header = ["method", "residual norm ratio κ farthest from 1",
              "beyond 3σ, first layer after the ablation", "KL(clean‖ablated)", "ΔCE"]  # fmt: skip
    rates = ", ".join(f"{m} {v:.1f}×" for m, v in far.items())
    groups = check("shift-groups")
    claims = []
    if groups is not None:  # outlier-rate ratio zero / other method, over disjoint block groups
        w = groups.pivot_table(index="group", columns="method", values="ratio")
        n = len(w)
        claims = [Claim(f"outlier rate ratio zero − {m}", t_interval(w["zero"] - w[m]), 0, ">",
                        replicates=f"t-interval over {n} disjoint groups of blocks")
                  for m in w.columns if m != "zero"]  # fmt: skip
    v = combine([c.verdict for c in claims]) if claims else "inconclusive"
    lines = [figure("shift/shift.png", "shift.png", "shift") + command("shift"), "",
             table(header, rows), "",
             f"Outlier rate vs clean (first layer after the ablation): {rates}."]  # fmt: skip
    if claims:
        lines += ["", claims_table(claims)]
    else:
        lines.append("No replicate interval (the run stores one value per method and layer).")
    lines += ["", f'"Zero ablation is the off-distribution method": **{v}**.']
    return Rendered("\n".join(lines), [Verdict("shift", v, rates)])


# --- detect, cascade ---------------------------------------------------------------------------


def render_detect() -> Rendered | None:
    t = read("detect")
    if t is None:
        return None
    lines = [figure("detect/detect.png", "detect_smollm2.png", "detect") + command("detect"), ""]
    for metric in ("induction_diag", "induction", "previous_token_diag", "duplicate_token"):
        g = t[t["metric"] == metric].sort_values("value", ascending=False, kind="stable")
        if len(g):
            top = ", ".join(f"{head(r)} {r.value:.2f}" for r in g.head(6).itertuples())
            lines.append(f"- {metric}: {top} ({int((g['value'] > 0.4).sum())} above 0.4)")
    return Rendered("\n".join(lines))


def render_cascade() -> Rendered | None:
    t, b = read("cascade"), read("cascade", "backups.csv")
    off = read("cascade", "off_target.csv")
    if t is None:
        return None
    removed = t[t["removed"]].sort_values("step")
    steps = ", ".join(f"{head(r)} ({s(r.effect)})" for r in removed.itertuples())
    lines = [
        figure("cascade/cascade.png", "cascade.png", "cascade") + command("cascade"),
        "",
        f"Removed in order (effect on CE when removed): {steps}.",
    ]
    if b is not None and len(b):
        lines.append("Backups flagged:")
        lines += [f"- L{r.layer}.H{r.head}: {s(r.effect_before)} → {s(r.effect_after)} after "
                  f"L{r.trigger_layer}.H{r.trigger_head} is removed ({r.share:.0%} of the "
                  "trigger's effect)" for r in b.itertuples()]  # fmt: skip
    if off is not None:
        rows = []
        for target, g in off.groupby("target", sort=False):
            sel = g.set_index("selected_on")
            rows.append([f"{target} ({g['metric'].iloc[0]})", f"{g['baseline'].iloc[0]:.2f}",
                         *(s(sel.loc[n, "delta"]) for n in sel.index)])  # fmt: skip
        lines += ["", "Off-target cost (Δ of each target's metric):", "",
                  table(["target", "clean", *off["selected_on"].unique()], rows)]  # fmt: skip
    n = 0 if b is None else len(b)
    claims = _backup_claims()
    if not claims:  # one greedy path and means only: no interval
        v = "inconclusive"
        lines += ["", f"{n} backups flagged; without the per-example check there is no interval, "
                  f'so "backup heads appear only after removal" is **{v}** here.']  # fmt: skip
        return Rendered("\n".join(lines), [Verdict("cascade", v, f"{n} backups flagged")])
    verdicts = [c.verdict for c in claims]
    v = ("agrees" if "agrees" in verdicts else  # some backup is real on held-out examples
         "disagrees" if all(x == "disagrees" for x in verdicts) else "inconclusive")  # fmt: skip
    share = _cascade_share()
    lines += ["", f"Each flagged backup re-measured per example (`scripts/findings_checks.py`, "
              "checked against the run's means) on as many held-out examples of the task — the "
              "flags were chosen on the run's own examples, so only held-out ones test them. The "
              f"claim holds for a backup when its rise exceeds {share:g} × its trigger's effect "
              "(the run's `--share`):", "", claims_table(claims), "",
              "The claim agrees when some flagged backup holds on held-out examples and disagrees "
              f'when none does: "backup heads appear only after removal" **{v}**.']  # fmt: skip
    best = max(claims, key=lambda c: c.point)
    return Rendered("\n".join(lines), [Verdict("cascade", v, f"{n} backups flagged; "
                                                  f"best {best.interval()}")])  # fmt: skip


def _cascade_share() -> float:
    cmd = json.loads((RUNS / "cascade" / "manifest.json").read_text()).get("command", [])
    return float(cmd[cmd.index("--share") + 1]) if "--share" in cmd else 0.25


def _backup_claims() -> list[Claim]:
    """Per flagged backup, on the held-out examples of the cascade check: (effect after − effect
    before) − share × the trigger's effect, weighted by scored tokens, bootstrap over examples."""
    per = check("cascade-backups")
    if per is None:
        return []
    per, share = per[per["examples"] == "held-out"], _cascade_share()
    out = []
    for (ly, h, tl, th), g in per.groupby(["layer", "head", "trigger_layer", "trigger_head"],
                                          sort=False):  # fmt: skip
        w = g["weight"].to_numpy()
        rise = (g["effect_after"] - g["effect_before"] - share * g["trigger_effect"]).to_numpy()
        est = mean_interval(rise, w)
        out.append(Claim(f"L{ly}.H{h}: rise − {share:g} × effect of L{tl}.H{th}", est, 0, ">",
                         replicates=f"bootstrap over {len(g)} held-out examples"))  # fmt: skip
    return out


# --- compare and attention ---------------------------------------------------------------------


def _mean_rho(arrays: dict, counts: np.ndarray) -> dict[str, float]:
    """Each measure's mean Spearman ρ with the other measures, for example weights ``counts``
    (``arrays``: headlab's per-measure arrays of a compare run's per-example table)."""
    from headlab.analyses.ranking import rank_correlation

    scores = {m: a.scores(counts[None, :])[0] for m, a in arrays.items()}
    names = list(scores)
    rho: dict[str, list[float]] = {m: [] for m in names}
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            r = float(rank_correlation(scores[a][None], scores[b][None])[0])
            rho[a].append(r)
            rho[b].append(r)
    return {m: float(np.mean(v)) for m, v in rho.items()}


def render_compare() -> Rendered | None:
    t, per = read("compare", "agreement.csv"), read("compare", "per_example.parquet")
    if t is None or per is None:
        return None
    rows = [[r.measure, r.reference, f"{r.spearman:.2f} [{r.ci_low:.2f}, {r.ci_high:.2f}]",
             f"{r.topk_overlap:.2f}"] for r in t.itertuples()]  # fmt: skip
    k, n = int(t["k"].iloc[0]), int(t["n_examples"].iloc[0])
    lines = [figure("compare/compare.png", "compare_smollm2.png", "compare") + command("compare"),
             "", table(
        ["measure", "reference", "Spearman ρ [95 % CI]", f"top-{k} overlap"], rows)]  # fmt: skip
    ref = t["reference"].iloc[0]
    review = {ref: 0.41, "rollout": 0.35, "gradient": 0.28}
    from headlab.analyses.compare.stats import _arrays

    arrays, _ = _arrays(per)
    point = _mean_rho(arrays, np.ones(n))
    if not set(review) <= set(point):
        return Rendered("\n".join(lines))
    claims = []
    order = list(review)
    for a, b in itertools.pairwise(order):
        diff = lambda c, a=a, b=b: (lambda r: r[a] - r[b])(_mean_rho(arrays, c))  # noqa: E731
        est = bootstrap_interval(diff, n)
        claims.append(Claim(f"mean ρ({a}) − mean ρ({b})", est, 0, ">",
                            replicates=f"bootstrap over {n} examples"))  # fmt: skip
    v = combine([c.verdict for c in claims])
    listed = ", ".join(f"{m} {point[m]:.2f} (review {review[m]:.2f})" for m in order)
    lines += ["", f"Mean ρ with the other measures (the review's statistic): {listed}.", "",
              claims_table(claims), "",
              f"Ordering {' > '.join(order)}: **{v}** with the review's ordering."]  # fmt: skip
    return Rendered("\n".join(lines), [Verdict("compare", v, listed)])


def render_attention() -> Rendered | None:
    lines, claims = [], []
    lines.append(figure("attention/faithfulness.png", "attention_faithfulness_names.png",
                        "faithfulness, names")
                 + figure("attention-induction/faithfulness.png",
                          "attention_faithfulness_induction.png", "faithfulness, induction")
                 + figure("attention/head_L24_H4.png", "attention_head_L24_H4.png",
                          "head L24.H4 on an IOI prompt"))  # fmt: skip
    for name, task in (("attention", "names"), ("attention-induction", "induction")):
        t, summ = read(name), read(name, "summary.csv")
        if t is None or summ is None:
            continue
        r = summ.iloc[0]
        by_att = t.sort_values("plausibility", ascending=False).head(5)
        by_eff = t.sort_values("abs_effect", ascending=False).head(5)
        att = ", ".join(
            f"{head(h)} {h.plausibility:.2f} (effect {s(h.effect)})" for h in by_att.itertuples()
        )
        eff = ", ".join(
            f"{head(h)} {s(h.effect)} (attention {h.plausibility:.2f})" for h in by_eff.itertuples()
        )
        c = Claim(f"ρ(attention mass, |effect|), {task}",
                  (r["spearman"], r["ci_low"], r["ci_high"]), 0.5, "<",
                  replicates=f"bootstrap over {int(r['n_examples'])} examples")  # fmt: skip
        claims.append(c)
        lines += [
            f"**{task}** ({r['metric']}, {r['method']} ablation, {int(r['n_examples'])} examples): "
            + command(name),
            f"- most attention on the key tokens ({r['keys']}): {att}",
            f"- largest |effect|: {eff}",
            f"- ρ(attention mass, |effect|) {c.interval()}; top-{int(r['top_k'])} overlap "
            f"{int(r['top_k_overlap'])} "
            f"(chance {r['chance_overlap']:.2f})",
            "",
        ]
    if not claims:
        return None
    v = combine([c.verdict for c in claims])
    lines += [claims_table(claims), "", f'"Attention is plausible but not faithful": **{v}**.']
    nums = "; ".join(c.interval() for c in claims)
    return Rendered("\n".join(lines), [Verdict("attention", v, f"ρ {nums}")])


# --- Causal Head Gating ------------------------------------------------------------------------

#: the three CHG fits as the document names them
GATE_FITS = {"clean": "clean model", "zero": "G⁰ (λ = 0)", "plus": "G⁺ (λ = +0.1)",
             "minus": "G⁻ (λ = −0.1)"}  # fmt: skip


def _gate_nll() -> str:
    """The NLL table (mean ± sd over masks) on the fitting and held-out sequences, the open gates,
    and how much each fit's NLL still fell over its last 20 updates."""
    summ, curves = read("gate", "summary.csv"), read("gate", "curves.parquet")
    rows = []
    for gates, g in summ.groupby("gates", sort=False):
        cells = []
        for split in ("fit", "heldout"):
            x = g[g["split"] == split]["nll"]
            cells.append(f"{x.mean():.2f}" + (f" ± {x.std(ddof=1):.2f}" if len(x) > 1 else ""))
        if curves is not None and gates in set(curves["fit"]):
            c = curves[curves["fit"] == gates].groupby("step")["nll"].mean()
            last = c.index.max()
            was, now = c.loc[max(0, last - 20)], c.loc[last]
            cells.append(f"{(now - was) / was:+.1%}".replace("-", "−"))
        else:
            cells.append("—")
        rows.append([GATE_FITS.get(gates, gates), *cells, f"{g['n_open'].mean():.0f}"])
    return table(["gates", "NLL, fitting sequences", "NLL, held-out", "NLL change, last 20 "
                  "updates", "gates open (of all heads)"], rows)  # fmt: skip


def _gate_claims(per: pd.DataFrame, k: int, harm: str) -> tuple[list[Claim], Claim | None]:
    """On the held-out sequences: the top-k facilitating heads (mask-averaged labels, then each
    mask's own) against the random sets, and the interfering heads against no change."""
    held = per[per["examples"] == "held-out"]
    rand = held[held["group"] == "random"].pivot(index="draw", columns="example", values="effect")
    n, n_rand = rand.shape[1], rand.shape[0]
    reps = f"bootstrap over {n} held-out sequences and the {n_rand} random sets together"

    def top(group: str, draw: int = 0) -> tuple[np.ndarray, np.ndarray]:
        g = held[(held["group"] == group) & (held["draw"] == draw)].sort_values("example")
        return g["effect"].to_numpy(), g["weight"].to_numpy()

    fac = [("facilitating", 0, f"top-{k} facilitating (mask-averaged labels)")]
    fac += [
        ("facilitating-mask", int(d), f"mask {int(d)}'s own top-{k} facilitating")
        for d in sorted(held.loc[held["group"] == "facilitating-mask", "draw"].unique())
    ]
    claims = []
    for grp, d, what in fac:
        e, w = top(grp, d)
        claims.append(
            Claim(
                f"{what} − random sets of {k}: {harm}",
                vs_random_interval(e, rand.to_numpy(), w),
                0,
                ">",
                replicates=reps,
            )
        )
    bad = None
    if (held["group"] == "interfering").any():
        e, w = top("interfering")
        est = mean_interval(e, w)
        bad = Claim(f"interfering heads (at most {k}) zeroed: {harm}", est, 0, "<",
                    replicates=f"bootstrap over {n} held-out sequences")  # fmt: skip
    return claims, bad


def render_gate() -> Rendered | None:
    val, heads = read("gate", "validation.csv"), read("gate", "heads.parquet")
    if val is None or heads is None or read("gate", "summary.csv") is None:
        return None
    k = int(val.loc[val["group"] == "facilitating", "n_heads"].iloc[0])
    harm = _harm(str(val["metric"].iloc[0]))
    counts = heads["label"].value_counts()
    lines = [
        figure("gate/labels.png", "gate_labels_smollm2.png", "CHG labels") + command("gate"),
        "",
        "Labels (mask-averaged gates, threshold 0.5): "
        + ", ".join(f"{n} {label}" for label, n in counts.items())
        + "; a head's label is shared by the masks' own labels at a mean rate of "
        f"{heads['agreement'].mean():.2f} (unstable: G⁺ below and G⁻ above the threshold).",
        "",
        _gate_nll(),
    ]
    per = check("gate-validation")
    if per is None:  # the run's own validation only: in-sample means, no interval
        lines += ["", "Without the held-out check the validation is in-sample and has no "
                  'interval, so "CHG labels are causal" is **inconclusive** here.']  # fmt: skip
        return Rendered("\n".join(lines), [Verdict("gate", "inconclusive", "in-sample only")])
    by = per.assign(x=per["effect"] * per["weight"]).groupby(["group", "draw", "examples"],
                                                             sort=False)  # fmt: skip
    means = by[["x", "weight"]].sum()
    means = (means["x"] / means["weight"]).unstack("examples")
    if "split" in val.columns:  # the run's own held-out validation (its statistics split)
        split = val[val["split"] == "heldout"].set_index(["group", "draw"])["effect"]
        means["stats split"] = split.reindex(means.index).to_numpy()
    rows = []
    for group, g in means.groupby(level="group", sort=False):
        label = {
            "random": f"random sets of {k} (mean ± sd of {len(g)})",
            "facilitating-mask": "each mask's own top facilitating",
        }.get(group, group)
        cols = ["run", "held-out", *(["stats split"] if "stats split" in means else [])]
        cells = ["—" if g[c].isna().all() else s(g[c].iloc[0]) if len(g) == 1 else
                 f"{s(g[c].mean())} ± {g[c].std(ddof=1):.2f}" for c in cols]  # fmt: skip
        rows.append([label, *cells])
    claims, bad = _gate_claims(per, k, harm)
    v = combine([c.verdict for c in claims])
    lines += ["", f"Zero-ablation of the labelled heads ({harm}, oriented so that positive hurts), "
              "on the fitting sequences (the run's `validation.csv`, reproduced per sequence by "
              "`scripts/findings_checks.py`) and on held-out sequences of the task (a different "
              "seed, checked to share no sequence with the fitting ones):", "",
              table(["heads zeroed", "fitting sequences", "held-out",
                     *(["held-out: the run's statistics split"] if "stats split" in means else [])],
                    rows), "",
              "The claims, on the held-out sequences only (the labels were fitted on the "
              "others):", "", claims_table(claims + ([bad] if bad else [])), "",
              "The mask-averaged labels and each mask's own labels must all beat the random sets: "
              f'"CHG labels are causal" **{v}**.']  # fmt: skip
    fac = means.loc[("facilitating", 0), "held-out"]
    rnd = means.loc["random", "held-out"].mean()
    out = [Verdict("gate", v, f"held out, k = {k}: {s(fac)} vs random {s(rnd)}; "
                              f"{binding(claims)}")]  # fmt: skip
    if bad is not None:
        out.append(Verdict("gate-interfering", bad.verdict, f"held out: {bad.interval()}"))
    return Rendered("\n".join(lines), out)


def render_steer() -> Rendered | None:
    r = findings_steer.render(RUNS, command, table)
    return None if r is None else Rendered(r[0], [Verdict("steer", r[1], r[2])])


RENDERERS: dict[str, Callable[[], Rendered | None]] = {
    "sweep": render_sweep,
    "prune-heads": render_prune_heads,
    "prune-head-methods": render_prune_head_methods,
    "prune-neurons": render_prune_neurons,
    "minilm": render_minilm,
    "digits": render_digits,
    "shift": render_shift,
    "detect": render_detect,
    "cascade": render_cascade,
    "gate": render_gate,
    "compare": render_compare,
    "attention": render_attention,
    "steer": render_steer,
}
