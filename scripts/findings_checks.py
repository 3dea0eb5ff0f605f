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


def _agree(got: float, ref: float, what: str, tol: float = 1e-4) -> None:
    """Stop unless a check's recomputed mean ``got`` equals the run's ``ref`` (relative ``tol``)."""
    if abs(got - ref) > tol * max(1.0, abs(ref)):
        raise SystemExit(f"findings: {what}: {got} vs the run's {ref}")


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
        _agree(sc["ce"].mean - clean["ce"].mean, ref, f"per-block check at {f}: mean")
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
        _agree(mean, ref, f"shift check {m}: group KL", tol=1e-3)
    got.to_parquet(_out(out.name))
    return out


def _task_examples(run: str, tokenizer: Any, n_held_out: int, seed: int) -> tuple[Any, Any]:
    """Task run ``run``'s own examples (fingerprint-checked) and ``n_held_out`` examples of the
    same task from task seed ``seed``, checked to share none with the run's."""
    from headlab.data.blocks import batch_fingerprint
    from headlab.data.tasks import load_task

    ident = _identity(run)
    own = load_task(ident["task"], tokenizer, n=ident["n_blocks"], seed=ident["seed"],
                    seq_len=ident["seq_len"]).eval  # fmt: skip
    if batch_fingerprint(own) != ident["eval_fingerprint"]:
        raise SystemExit(f"findings: cannot rebuild the examples of {run}")
    new = load_task(ident["task"], tokenizer, n=n_held_out, seed=seed,
                    seq_len=ident["seq_len"]).eval  # fmt: skip
    if {tuple(x) for x in own.input_ids.tolist()} & {tuple(x) for x in new.input_ids.tolist()}:
        raise SystemExit(f"findings: the held-out examples of {run} repeat some of its own")
    return own, new


def check_cascade(run: str = "cascade", held_out_seed: int = 1) -> Path | None:
    """Per example, each backup the cascade flagged: its effect before and after its trigger is
    removed, and the trigger's own effect, on the run's examples (checked against the run's
    means) and on as many held-out examples of the same task (``held_out_seed``: the flags were
    chosen on the run's examples, so only the held-out ones test them)."""
    out = RUNS / "checks" / f"{run}-backups.parquet"
    backups = RUNS / run / "backups.csv"
    if out.is_file() or not complete(run) or not backups.is_file():
        return out if out.is_file() else None
    import torch

    from headlab.analyses.cascade import removed_heads
    from headlab.engine import run_plans
    from headlab.interventions import Plan, intervention_from_name
    from headlab.metrics import get_metric
    from headlab.models.layout import describe
    from headlab.models.load import load_model

    ident = _identity(run)
    model, tok = load_model(ident["model"])
    layout = describe(model)
    own, new = _task_examples(run, tok, ident["n_blocks"], held_out_seed)
    removed = removed_heads(pd.read_parquet(RUNS / run / "results.parquet"))
    m, iv = get_metric(ident["metric"]), intervention_from_name(ident["method"])
    sign = -1.0 if m.higher_is_better else 1.0
    rows = []
    for b in pd.read_csv(backups).itertuples():
        before = removed[: b.step - 1]  # removed before the round that removed the trigger
        after = removed[: b.step]
        if after[-1] != (b.trigger_layer, b.trigger_head):
            raise SystemExit("findings: the cascade's backups do not match its removal order")
        h = (int(b.layer), int(b.head))
        plans = [Plan.heads(s, iv) if s else Plan() for s in (before, [*before, h], after,
                                                              [*after, h])]  # fmt: skip
        for examples, batch in (("run", own), ("held-out", new)):
            with torch.no_grad():
                sc = run_plans(model, batch, plans, [m], layout=layout)
            base, with_h, trig, both = (sign * s[m.name].per_example.double().numpy() for s in sc)
            weight = sc[0][m.name].weight.double().numpy()
            for i, ref in ((1, b.effect_before), (3, b.effect_after)) if examples == "run" else ():
                mean = sign * (sc[i][m.name].mean - sc[i - 1][m.name].mean)
                _agree(mean, ref, f"cascade check L{b.layer}.H{b.head}: effect")
            rows += [{"step": b.step, "layer": b.layer, "head": b.head,
                      "trigger_layer": b.trigger_layer, "trigger_head": b.trigger_head,
                      "examples": examples, "example": i, "effect_before": eb, "effect_after": ea,
                      "trigger_effect": te, "weight": w}
                     for i, (eb, ea, te, w) in enumerate(zip(with_h - base, both - trig,
                                                             trig - base, weight, strict=True))
                     ]  # fmt: skip
    pd.DataFrame(rows).to_parquet(_out(out.name))
    return out


def check_steer_cost(run: str) -> Path | None:
    """Per corpus block, the CE change of a steering run's selected heads at each of its α
    (rebuilt from the run's manifest and checked against the run's means), so the cost claim
    gets a paired interval; steer itself stores only each condition's mean and sd."""
    out = RUNS / "checks" / f"{run}-cost.parquet"
    if out.is_file() or not (RUNS / run / "results.parquet").is_file():
        return out if out.is_file() else None
    import torch

    from headlab.data.targets import target_batch
    from headlab.engine import run_plans
    from headlab.interventions import Plan, Scale
    from headlab.models.layout import describe, max_positions
    from headlab.models.load import load_model

    manifest = json.loads((RUNS / run / "manifest.json").read_text())
    ident, heads = manifest["identity"], [tuple(h) for h in manifest["heads"]]
    if not ident.get("data"):
        return None
    model, tok = load_model(ident["model"])
    batch, metric = target_batch(ident["data"], tok, n=ident["n_blocks"],
                                 seed=ident["config"]["seed"], seq_len=ident["seq_len"],
                                 max_positions=max_positions(model))  # fmt: skip
    t = pd.read_parquet(RUNS / run / "results.parquet")
    t = t[(t["selection"] == "selected") & (t["metric"] == metric) & (t["target"] != "concept")]
    alphas = [float(a) for a in t["alpha"]]
    plans = [Plan(), *(Plan.heads(heads, Scale(a)) for a in alphas)]
    with torch.no_grad():
        clean, *scored = run_plans(model, batch, plans, [metric], layout=describe(model))
    rows = []
    for a, ref, sc in zip(alphas, t["delta"], scored, strict=True):
        _agree(sc[metric].mean - clean[metric].mean, ref, f"steering cost check of {run} at "
               f"α = {a:g}")  # fmt: skip
        d = (sc[metric].per_example - clean[metric].per_example).double().numpy()
        rows += [{"alpha": a, "block": i, "delta": v} for i, v in enumerate(d)]
    pd.DataFrame(rows).to_parquet(_out(out.name))
    return out


def check_gate(run: str = "gate", held_out_seed: int = 1, n_held_out: int = 64) -> Path | None:
    """Per example, the zero-ablation effect of the head groups ``headlab gate --validate``
    ablates (the top-k facilitating heads of the mask-averaged labels, its interfering heads, its
    random sets) and of each mask's own top-k facilitating heads, on the run's fitting sequences
    (checked against its ``validation.csv``) and on ``n_held_out`` held-out sequences of the same
    task (``held_out_seed``): the gates were fitted on the run's sequences, so only held-out ones
    test the labels."""
    out = RUNS / "checks" / f"{run}-validation.parquet"
    val_path = RUNS / run / "validation.csv"
    if out.is_file() or not complete(run) or not val_path.is_file():
        return out if out.is_file() else None
    import torch
    from safetensors.torch import load_file

    from headlab.analyses.gates import head_taxonomy, label_groups
    from headlab.engine import run_plans
    from headlab.heads import top_heads
    from headlab.interventions import Plan, Zero
    from headlab.metrics import get_metric
    from headlab.models.layout import describe
    from headlab.models.load import load_model

    ident, val = _identity(run), pd.read_csv(val_path)
    if "split" in val.columns:  # headlab gate validates on its held-out split too
        val = val[val["split"] == "fit"]
    model, tok = load_model(ident["model"])
    layout = describe(model)
    own, new = _task_examples(run, tok, n_held_out, held_out_seed)
    k = int(val.loc[val["group"] == "facilitating", "n_heads"].iloc[0])
    n_random = int((val["group"] == "random").sum())
    threshold = ident["config"]["threshold"]
    groups = label_groups(pd.read_parquet(RUNS / run / "heads.parquet"), k=k, n_random=n_random,
                          seed=ident["seed"])  # fmt: skip
    thetas = [load_file(RUNS / run / f"theta-{f}.safetensors")["value"]
              for f in ("zero", "plus", "minus")]  # fmt: skip
    for mask in range(thetas[0].shape[0]):
        own_labels = head_taxonomy(*(t[mask : mask + 1] for t in thetas), threshold)
        groups[f"facilitating-mask:{mask}"] = top_heads(own_labels, "facilitating", k)
    m = get_metric(val["metric"].iloc[0])
    sign = -1.0 if m.higher_is_better else 1.0
    names = list(groups)
    plans = [Plan()] + [Plan.heads(list(groups[n]), Zero()) for n in names]
    rows = []
    for examples, batch in (("run", own), ("held-out", new)):
        with torch.no_grad():
            clean, *scored = run_plans(model, batch, plans, [m], layout=layout)
        base = clean[m.name].per_example.double().numpy()
        weight = clean[m.name].weight.double().numpy()
        for name, sc in zip(names, scored, strict=True):
            group, _, draw = name.partition(":")
            effect = sign * (sc[m.name].per_example.double().numpy() - base)
            if examples == "run" and group in set(val["group"]):
                ref = val[(val["group"] == group) & (val["draw"] == int(draw or 0))]["effect"]
                _agree(sign * (sc[m.name].mean - clean[m.name].mean), float(ref.iloc[0]),
                       f"gate check {name}: effect")  # fmt: skip
            rows += [{"group": group, "draw": int(draw or 0), "examples": examples, "example": i,
                      "effect": e, "weight": w}
                     for i, (e, w) in enumerate(zip(effect, weight, strict=True))]  # fmt: skip
    pd.DataFrame(rows).to_parquet(_out(out.name))
    return out
