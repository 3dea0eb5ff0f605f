"""Per-example checks for ``scripts/findings.py``: the intervals of claims whose run stores one
curve (prune's importance order, shift), recomputed with headlab's own functions from the run's
ranking and statistics and checked against the run's means; and the held-out check of the
evaluation blocks. Each check rebuilds its run's evaluation blocks from the run's manifest (and
refuses blocks whose fingerprint differs). Results go to ``RUNS/checks``; a finished check is not
recomputed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

RUNS = Path(__file__).resolve().parents[1] / "runs" / "findings"


def complete(name: str) -> bool:
    """Whether run ``name`` under ``RUNS`` has finished."""
    path = RUNS / name / "manifest.json"
    return path.is_file() and json.loads(path.read_text()).get("status") == "complete"


def _identity(run: str) -> dict[str, Any]:
    return json.loads((RUNS / run / "manifest.json").read_text())["identity"]


def _blocks(run: str, tokenizer: Any) -> Any:
    """Run ``run``'s evaluation blocks (the CLI's ``make_blocks`` call), fingerprint-checked."""
    from headlab.data.blocks import batch_fingerprint, make_blocks
    from headlab.data.corpora import load_texts

    ident = _identity(run)
    ev, _ = make_blocks(tokenizer, load_texts(ident["data"], text_field=ident["text_field"]),
                        seq_len=ident["seq_len"], n_blocks=ident["n_blocks"],
                        n_stats_blocks=ident["n_stats_blocks"], seed=ident["seed"])  # fmt: skip
    if batch_fingerprint(ev) != ident["eval_fingerprint"]:
        raise SystemExit(f"findings: cannot rebuild the evaluation blocks of {run}")
    return ev


def _out(name: str) -> Path:
    folder = RUNS / "checks"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


def check_held_out(ranking: str = "sweep-docs", runs: tuple[str, ...] = ("prune-heads", "shift")
                   ) -> Path | None:  # fmt: skip
    """Stop if an evaluation block of ``runs`` is among the ranking run's blocks (checked once
    per run that exists)."""
    from headlab.models.load import load_model

    have = [
        r for r in runs if complete(r) and not (RUNS / "checks" / f"held-out-{r}.txt").is_file()
    ]
    if not have or not complete(ranking):
        return None
    _, tok = load_model(_identity(ranking)["model"])
    rank = {tuple(r) for r in _blocks(ranking, tok).input_ids.tolist()}
    for r in have:
        ev = {tuple(x) for x in _blocks(r, tok).input_ids.tolist()}
        if rank & ev:
            raise SystemExit(f"findings: {len(rank & ev)} evaluation blocks of {r} rank heads")
        out = _out(f"held-out-{r}.txt")
        out.write_text(f"{len(ev)} evaluation blocks of {r}, {len(rank)} ranking blocks of "
                       f"{ranking}: none shared\n")  # fmt: skip
    return out


def check_prune_heads(run: str = "prune-heads", sweep: str = "sweep-docs",
                      fractions: tuple[float, ...] = (0.5, 0.7)) -> Path | None:  # fmt: skip
    """ΔCE per evaluation block at ``fractions`` of heads in the run's importance order (zero
    ablation, ranked by ``sweep``), checked against the run's means."""
    out = RUNS / "checks" / f"{run}-examples.parquet"
    if out.is_file() or not complete(run):
        return out if out.is_file() else None
    import torch

    from headlab.analyses.prune import _count, _importance_order, prune_plan
    from headlab.engine import run_plans
    from headlab.interventions import Plan, intervention_from_name
    from headlab.models.layout import describe
    from headlab.models.load import load_model

    model, tok = load_model(_identity(run)["model"])
    layout = describe(model)
    ev = _blocks(run, tok)
    order, _ = _importance_order(
        layout, pd.read_parquet(RUNS / sweep / "results.parquet"), "zero", "ce"
    )
    t = pd.read_parquet(RUNS / run / "results.parquet")
    iv = intervention_from_name("zero")
    plans = [prune_plan(layout, "head", order[: _count(layout, "head", f)], iv) for f in fractions]
    with torch.no_grad():
        clean, *scored = run_plans(model, ev, [Plan(), *plans], ["ce"], layout=layout)
    rows = []
    for f, sc in zip(fractions, scored, strict=True):
        d = (sc["ce"].per_example - clean["ce"].per_example).double().numpy()
        ref = t[(t["order"] == "sweep") & (t["method"] == "zero") & (t["metric"] == "ce")
                & ((t["fraction"] - f).abs() < 1e-9)]["delta"].iloc[0]  # fmt: skip
        if abs(sc["ce"].mean - clean["ce"].mean - ref) > 1e-4 * max(1.0, abs(ref)):
            raise SystemExit(f"findings: per-block check at {f}: mean "
                             f"{sc['ce'].mean - clean['ce'].mean} vs the run's {ref}")  # fmt: skip
        rows += [{"method": "zero", "fraction": f, "block": i, "delta": v} for i, v in enumerate(d)]
    pd.DataFrame(rows).to_parquet(_out(out.name))
    return out


def check_shift(run: str = "shift", groups: int = 4) -> Path | None:
    """The shift run's conditions on ``groups`` disjoint groups of its evaluation blocks: per
    group and method the outlier-rate ratio (beyond 3σ, first layer after the ablation, over the
    clean rate) and KL; the groups' mean KL is checked against the run's (zero, mean, peak)."""
    out = RUNS / "checks" / f"{run}-groups.parquet"
    if out.is_file() or not complete(run):
        return out if out.is_file() else None
    import torch

    from headlab.analyses.shift import conditions, shift
    from headlab.models.layout import describe
    from headlab.models.load import load_model
    from headlab.stats import Stats

    manifest = json.loads((RUNS / run / "manifest.json").read_text())
    heads = [tuple(h) for h in manifest["heads"]]
    model, tok = load_model(manifest["identity"]["model"])
    layout = describe(model)
    ev = _blocks(run, tok)
    stats = Stats.load(RUNS / run / "stats.safetensors", model=model)
    table = pd.read_parquet(RUNS / run / "results.parquet")
    conds = conditions(heads, list(dict.fromkeys(table["method"])))
    size = len(ev) // groups
    rows = []
    with torch.no_grad():
        for g in range(groups):
            sub = ev.select(torch.arange(g * size, (g + 1) * size))
            t = shift(model, sub, conds, stats=stats, layout=layout)
            for m, tm in t.groupby("method", sort=False):
                s3 = tm[tm["metric"] == "frac_3sigma"].sort_values("at_layer").iloc[0]
                kl = float(tm[tm["metric"] == "kl"]["value"].iloc[0])
                rows.append({"group": g, "method": m, "kl": kl,
                             "ratio": s3["value"] / max(s3["baseline"], 1e-12)})  # fmt: skip
    got = pd.DataFrame(rows)
    for m in set(got["method"]) & {"zero", "mean", "peak"}:
        ref = float(table[(table["method"] == m) & (table["metric"] == "kl")]["value"].iloc[0])
        mean = float(got[got["method"] == m]["kl"].mean())
        if abs(mean - ref) > 1e-3 * max(1.0, abs(ref)):
            raise SystemExit(f"findings: shift check {m}: group KL {mean} vs the run's {ref}")
    got.to_parquet(_out(out.name))
    return out
