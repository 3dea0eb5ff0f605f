"""The analysis panels of the atlas: one interactive plotly figure per analysis a run holds
(pruning curves, cascade rounds, shift, compare agreement and ranks, steering curves, attention
vs effect, gate and L0 trade-offs, estimate vs exact). Each reads the tables the job wrote, with
their own column names; points that stand for one head carry ``customdata = [layer, head]`` so
that clicking them opens the head's card.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from headlab.atlas.rundirs import RunView

__all__ = ["Panel", "run_panels"]

#: the ``meta`` of a trace whose points are heads (``customdata = [layer, head]``)
HEADS = "heads"
COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]


@dataclass
class Panel:
    """One figure of one run."""

    run: str
    title: str
    figure: go.Figure


def _heads(table: pd.DataFrame) -> list[list[int]]:
    return [[int(a), int(b)] for a, b in zip(table["layer"], table["head"], strict=True)]


def _names(table: pd.DataFrame) -> list[str]:
    return [f"L{int(a)}.H{int(b)}" for a, b in zip(table["layer"], table["head"], strict=True)]


def _prune(run: RunView) -> list[Panel]:
    s = run.table("summary.csv")
    if s is None:
        return []
    metrics = list(dict.fromkeys(s["metric"]))
    fig = make_subplots(rows=1, cols=len(metrics), subplot_titles=[f"Δ{m}" for m in metrics])
    dash = {"random": "solid", "sweep": "dash", "iterative": "dot"}
    keys = list(dict.fromkeys(zip(s["order"], s["method"], strict=True)))
    for col, metric in enumerate(metrics, start=1):
        for i, (order, method) in enumerate(keys):
            g = s[(s["metric"] == metric) & (s["order"] == order) & (s["method"] == method)]
            g = g.sort_values("fraction")
            sd = g["delta_sd"].fillna(0) if order == "random" else None
            fig.add_trace(
                go.Scatter(
                    x=g["fraction"], y=g["delta"], name=f"{method} ({order})",
                    legendgroup=f"{order}/{method}", showlegend=col == 1,
                    line={"color": COLOURS[i % len(COLOURS)], "dash": dash.get(order, "dashdot")},
                    error_y=None if sd is None else {"array": sd, "visible": True},
                    hovertemplate="fraction %{x:.3g}: Δ %{y:+.4g}<extra>%{fullData.name}</extra>",
                ),
                row=1, col=col,
            )  # fmt: skip
        fig.update_xaxes(title_text=f"fraction of {s['unit'].iloc[0]}s ablated", row=1, col=col)
    return [Panel(run.label, "pruning curves (random orders: mean ± sd over seeds)", fig)]


def _cascade(run: RunView, top: int = 8) -> list[Panel]:
    table = run.table("results.parquet")
    if table is None:
        return []
    peak = table.groupby(["layer", "head"])["effect"].max().sort_values(ascending=False)
    backups = run.table("backups.csv")
    flagged = [] if backups is None else list(zip(backups["layer"], backups["head"], strict=True))
    fig = go.Figure()
    for i, (ly, h) in enumerate(dict.fromkeys([*peak.index[:top], *flagged])):
        g = table[(table["layer"] == ly) & (table["head"] == h)].sort_values("step")
        fig.add_trace(
            go.Scatter(
                x=g["step"], y=g["effect"], name=f"L{ly}.H{h}", meta=HEADS, customdata=_heads(g),
                mode="lines+markers", line={"color": COLOURS[i % len(COLOURS)]},
                hovertemplate="round %{x}: effect %{y:+.4g}<extra>%{fullData.name}</extra>",
            )
        )  # fmt: skip
    gone = table[table["removed"]].sort_values("step")
    ticks = ["none"] + [f"−L{r.layer}.H{r.head}" for r in gone.itertuples()]
    steps = sorted(set(table["step"]))
    fig.update_xaxes(tickvals=steps, ticktext=ticks[: len(steps)], title_text="round (head "
                     "removed before it)")  # fmt: skip
    fig.update_yaxes(title_text=f"effect on {table['metric'].iloc[0]}")
    return [Panel(run.label, "cascade: effects round after round", fig)]


def _shift(run: RunView) -> list[Panel]:
    table = run.table("results.parquet")
    if table is None:
        return []
    multi = table[table["n_heads"] > 1]["target"]
    target = multi.iloc[0] if len(multi) else table["target"].iloc[0]
    sub = table[table["target"] == target]
    fig = make_subplots(rows=1, cols=3, subplot_titles=["norm ratio", "beyond 3σ", "output KL"])
    methods = list(dict.fromkeys(sub["method"]))
    for i, m in enumerate(methods):
        g = sub[sub["method"] == m]
        for col, metric in ((1, "norm_ratio"), (2, "frac_3sigma")):
            r = g[g["metric"] == metric].sort_values("at_layer")
            fig.add_trace(
                go.Scatter(x=r["at_layer"], y=r["value"], name=m, legendgroup=m,
                           showlegend=col == 1, line={"color": COLOURS[i % len(COLOURS)]}),
                row=1, col=col,
            )  # fmt: skip
    kl = sub[sub["metric"] == "kl"]
    fig.add_trace(go.Bar(x=kl["method"], y=kl["value"], showlegend=False,
                         marker_color=COLOURS[: len(kl)]), row=1, col=3)  # fmt: skip
    fig.update_xaxes(title_text="layer (block output)", row=1, col=1)
    fig.update_xaxes(title_text="layer (block output)", row=1, col=2)
    return [Panel(run.label, f"distribution shift from ablating {target}", fig)]


def _compare(run: RunView) -> list[Panel]:
    agreement, scores = run.table("agreement.csv"), run.table("scores.parquet")
    if agreement is None or scores is None or agreement.empty:
        return []
    named = (("topk_overlap", "top-k overlap"), ("recall", "recall"),
             ("cost_fraction", "cost (share of the exact sweep)"))  # fmt: skip
    extra = [(c, words) for c, words in named if c in agreement.columns]
    hover = "".join(f", {words} %{{customdata[{i}]:.3g}}" for i, (_, words) in enumerate(extra))
    bar = go.Figure(
        go.Bar(
            x=agreement["measure"], y=agreement["spearman"],
            error_y={"type": "data", "symmetric": False,
                     "array": agreement["ci_high"] - agreement["spearman"],
                     "arrayminus": agreement["spearman"] - agreement["ci_low"]},
            customdata=agreement[[c for c, _ in extra]].to_numpy().tolist(),
            hovertemplate="%{x}: ρ = %{y:.3f}" + hover + "<extra></extra>",
        )
    )  # fmt: skip
    reference = agreement["reference"].iloc[0]
    bar.update_yaxes(title_text=f"Spearman ρ with {reference}", range=[-1, 1])
    ref = scores[scores["measure"] == reference].set_index(["layer", "head"])["rank"]
    measures = list(agreement["measure"])
    cols = min(3, len(measures))
    rows = -(-len(measures) // cols)
    scatter = make_subplots(rows=rows, cols=cols, subplot_titles=measures)
    for i, measure in enumerate(measures):
        mine = scores[scores["measure"] == measure].set_index(["layer", "head"])["rank"]
        both = pd.DataFrame({"x": ref, "y": mine.reindex(ref.index)}).reset_index()
        scatter.add_trace(
            go.Scatter(
                x=both["x"], y=both["y"], mode="markers", showlegend=False, text=_names(both),
                meta=HEADS, customdata=_heads(both), marker={"size": 5, "color": COLOURS[0]},
                hovertemplate="%{text}: rank %{x} vs %{y}<extra></extra>",
            ),
            row=i // cols + 1, col=i % cols + 1,
        )  # fmt: skip
    scatter.update_layout(height=260 * rows)
    return [
        Panel(run.label, f"agreement with {reference} (bootstrap interval)", bar),
        Panel(run.label, f"head ranks against {reference} (1 = most important)", scatter),
    ]


def _steer(run: RunView) -> list[Panel]:
    summary = run.table("summary.csv")
    if summary is None:
        return []
    a = summary["alpha"]
    others = [c[2:-9] for c in summary.columns if c.startswith("d_") and c.endswith("_selected")]
    fig = make_subplots(rows=1, cols=2, subplot_titles=["concept rate", "off-target change"])
    fig.add_trace(go.Scatter(x=a, y=summary["selected_rate"], name="selected heads",
                             line={"color": COLOURS[1]}), row=1, col=1)  # fmt: skip
    fig.add_trace(
        go.Scatter(x=a, y=summary["random_mean"], name="random heads (mean ± sd)",
                   error_y={"array": summary["random_sd"].fillna(0)},
                   line={"color": "grey"}), row=1, col=1,
    )  # fmt: skip
    fig.add_hline(y=float(summary["clean_rate"].iloc[0]), line_dash="dash", row=1, col=1)
    for i, name in enumerate(others):
        for kind, dash in (("selected", "solid"), ("random", "dot")):
            fig.add_trace(
                go.Scatter(x=a, y=summary[f"d_{name}_{kind}"], name=f"{name} ({kind})",
                           line={"color": COLOURS[(i + 2) % len(COLOURS)], "dash": dash}),
                row=1, col=2,
            )  # fmt: skip
    fig.update_xaxes(title_text="alpha (head output scale)")
    return [Panel(run.label, "steering: concept rate and off-target cost against alpha", fig)]


def _attention(run: RunView) -> list[Panel]:
    table, summary = run.table("results.parquet"), run.table("summary.csv")
    if table is None:
        return []
    fig = go.Figure(
        go.Scatter(
            x=table["plausibility"], y=table["abs_effect"], mode="markers", text=_names(table),
            meta=HEADS, customdata=_heads(table), marker={"size": 6, "color": COLOURS[0]},
            hovertemplate="%{text}: mass %{x:.4g}, |effect| %{y:.4g}<extra></extra>",
        )
    )  # fmt: skip
    fig.update_xaxes(title_text=f"attention mass on {table['keys'].iloc[0]} keys")
    fig.update_yaxes(title_text=f"|effect| of {table['method'].iloc[0]} ablation")
    title = "attention mass against causal effect"
    if summary is not None and len(summary):
        s = summary.iloc[0]
        title += (f" (Spearman ρ {s['spearman']:.3f}, 95 % CI [{s['ci_low']:.3f}, "
                  f"{s['ci_high']:.3f}])")  # fmt: skip
    return [Panel(run.label, title, fig)]


def _gate(run: RunView) -> list[Panel]:
    out = []
    curves = run.table("curves.parquet")
    if curves is not None:
        by = "fit" if "fit" in curves.columns else "lam"
        fig = go.Figure()
        for i, (key, g) in enumerate(curves.groupby(by, sort=False)):
            mean = g.groupby("step")["loss"].mean()
            fig.add_trace(go.Scatter(x=mean.index, y=mean.to_numpy(), name=f"{by} {key}",
                                     line={"color": COLOURS[i % len(COLOURS)]}))  # fmt: skip
        fig.update_xaxes(title_text="update")
        fig.update_yaxes(title_text="loss (mean over masks)")
        what = "gate" if by == "fit" else "L0"
        out.append(Panel(run.label, f"{what} fits: loss curves", fig))
    summary = run.table("summary.csv")
    if summary is not None and {"gates", "nll", "split"} <= set(summary.columns):
        mean = summary.groupby(["split", "gates"], sort=False)["nll"].mean().reset_index()
        fig = go.Figure()
        for i, (split, g) in enumerate(mean.groupby("split", sort=False)):
            marker = {"size": 11, "color": COLOURS[i % len(COLOURS)]}
            fig.add_trace(
                go.Scatter(x=g["gates"], y=g["nll"], name=str(split), mode="markers", marker=marker)
            )
        fig.update_yaxes(title_text="NLL")
        out.append(Panel(run.label, "gate trade-off: NLL with each fit's gates", fig))
    tradeoff = run.table("tradeoff.parquet")
    if tradeoff is not None:
        t = tradeoff.sort_values("n_kept")
        fig = go.Figure()
        for col, name in (("value", "deterministic gates"), ("value_binary", "kept heads on"),
                          ("value_heldout", "held-out split")):  # fmt: skip
            if col in t.columns:
                fig.add_trace(go.Scatter(
                    x=t["n_kept"], y=t[col], name=name, mode="lines+markers",
                    text=[f"λ = {lam:g}" for lam in t["lam"]],
                    hovertemplate="%{text}: %{x} heads kept, %{y:.5g}<extra>%{fullData.name}"
                    "</extra>",
                ))  # fmt: skip
        fig.add_hline(y=float(t["baseline"].iloc[0]), line_dash="dot")
        fig.update_xaxes(title_text="heads kept")
        fig.update_yaxes(title_text=str(t["metric"].iloc[0]))
        out.append(Panel(run.label, "L0 trade-off: heads kept against the metric", fig))
    return out


def _estimate(run: RunView) -> list[Panel]:
    exact, est = run.table("exact.parquet"), run.table("estimates.parquet")
    if exact is None or est is None or exact.empty:
        return []
    fig = go.Figure()
    ex = exact.set_index(["layer", "head", "metric"])["delta"]
    for i, (method, g) in enumerate(est[est["baseline"].notna()].groupby("method", sort=False)):
        g = g.set_index(["layer", "head", "metric"])
        both = pd.DataFrame({"x": ex, "y": g["delta"].reindex(ex.index)}).dropna().reset_index()
        fig.add_trace(go.Scatter(
            x=both["x"], y=both["y"], mode="markers", name=str(method), text=_names(both),
            meta=HEADS, customdata=_heads(both), marker={"color": COLOURS[i % len(COLOURS)]},
            hovertemplate="%{text}: exact %{x:+.4g}, estimate %{y:+.4g}<extra></extra>",
        ))  # fmt: skip
    fig.update_xaxes(title_text="exact Δ (ablation)")
    fig.update_yaxes(title_text="estimated Δ")
    return [Panel(run.label, "estimates against exact ablation (checked heads)", fig)]


PANELS: dict[str, Callable[[RunView], list[Panel]]] = {
    "prune": _prune,
    "cascade": _cascade,
    "shift": _shift,
    "compare": _compare,
    "steer": _steer,
    "attention": _attention,
    "gate": _gate,
    "gate-contrast": _gate,
    "l0": _gate,
    "estimate": _estimate,
}


def run_panels(run: RunView) -> list[Panel]:
    """The panels of ``run`` (none for a kind without analysis panels; a table that cannot be
    drawn is noted on the run and skipped)."""
    make = PANELS.get(run.kind)
    if make is None:
        return []
    try:
        return make(run)
    except (KeyError, AttributeError, IndexError, ValueError) as err:
        run.notes.append(f"its panels could not be drawn ({err!r})")
        return []


def figure_json(fig: go.Figure) -> dict[str, Any]:
    """``{"data", "layout"}`` of ``fig`` without its template (the page applies one shared
    template to every figure)."""
    import json

    import plotly.io as pio

    spec = json.loads(pio.to_json(fig, validate=False))
    spec.get("layout", {}).pop("template", None)
    return {"data": spec.get("data", []), "layout": spec.get("layout", {})}
