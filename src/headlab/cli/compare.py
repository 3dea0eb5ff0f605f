"""``headlab compare``: how well cheap importance measures (attribution patching, gradient
importance, attention rollout, raw attention) agree with exact ablation, on the same examples."""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from headlab.cli.common import (
    add_data_args,
    add_model_args,
    add_run_args,
    add_stats_args,
    csv_list,
    non_negative_int,
    positive_int,
)
from headlab.cli.common import status as status_printer
from headlab.cli.shared import (
    load_sweep,
    off_target_targets,
    open_run,
    prepared_inputs,
    run_stats,
)
from headlab.errors import ConfigError

NAME = "compare"
HELP = (
    "Rank agreement between head-importance measures on the same examples: exact ablation "
    "(each --methods), attribution patching, gradient importance, attention rollout and raw "
    "attention; Spearman with bootstrap intervals over examples, top-k overlap, scatter figure."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    # every head is ablated several times over: a default size that finishes in minutes
    add_data_args(p, n_blocks=4)
    g = p.add_argument_group("compare")
    g.add_argument(
        "--methods",
        default="zero,mean",
        help="exact single-head ablations (measures ablation:METHOD); the first is the reference",
    )
    g.add_argument(
        "--measures",
        default="atp,gradient,rollout,attention",
        help="cheap measures: atp (one per method), atp:METHOD, gradient, rollout, attention",
    )
    g.add_argument(
        "--metric",
        default=None,
        help="one metric with a gradient: ce, logit_diff, answer_logprob (default: ce for "
        "corpora, the task's own metric for tasks)",
    )
    g.add_argument(
        "--reference", default=None, help="measure to correlate with (default: ablation:FIRST)"
    )
    g.add_argument(
        "--bootstrap",
        type=non_negative_int("--bootstrap"),
        default=1000,
        help="bootstrap resamples of examples",
    )
    g.add_argument("--ci", type=float, default=0.95, help="bootstrap interval level")
    g.add_argument("--top-k", type=positive_int("--top-k"), default=10, help="top-k overlap size")
    g.add_argument(
        "--sweep",
        default=None,
        metavar="DIR",
        help="a headlab sweep run on the same model and blocks; its exact ablations are reused "
        "if it holds per-example data (per_example.parquet), otherwise they are recomputed",
    )
    g.add_argument(
        "--rollout-sources",
        default="context",
        choices=["context", "previous"],
        help="rollout / attention: route from the target position to positions 1..t-1 or to t-1",
    )
    g.add_argument(
        "--attention-keys",
        default="auto",
        choices=["auto", "context", "induction", "answer", "wrong", "previous"],
        help="attention: the key set whose attention mass is measured (auto: the answer's tokens "
        "for names, induction targets on repeated sequences, else earlier tokens but the first)",
    )
    g.add_argument(
        "--off-target",
        default="none",
        help="also ablate each measure's top-k heads (and k random ones) together with the "
        "reference's ablation method (else the first) on these targets: comma-separated tasks "
        "and/or corpora (CE); 'auto' = every other built-in task plus python-docs; 'none' "
        "(default) to skip",
    )
    add_stats_args(p)
    add_run_args(p)


def _check(args: argparse.Namespace) -> tuple[list[str], list[str], str]:
    from headlab.analyses.compare import measures

    methods = csv_list(args.methods)
    names = measures(methods, csv_list(args.measures))
    reference = args.reference or names[0]
    if reference not in names:
        raise ConfigError(
            f"--reference {reference} is not one of the measures compared ({', '.join(names)})"
        )
    if args.bootstrap < 0:
        raise ConfigError(f"--bootstrap must be >= 0 (0: no intervals), got {args.bootstrap}")
    if not 0 < args.ci < 1:
        raise ConfigError(f"--ci must be between 0 and 1 (e.g. 0.95), got {args.ci}")
    if args.top_k < 1:
        raise ConfigError(f"--top-k must be at least 1, got {args.top_k}")
    return methods, names, reference


def _needs_stats(names: list[str]) -> bool:
    from headlab.interventions import intervention_from_name

    return any(intervention_from_name(n.partition(":")[2]).needs for n in names if ":" in n)


def _reuse_sweep(args, prepared, run_dir, names, metric, say) -> None:
    """Save the per-example exact ablations of a ``--sweep`` run as this run's parts."""
    from headlab.analyses.compare import part_key
    from headlab.analyses.compare_stats import PER_EXAMPLE_COLUMNS

    _, same = load_sweep(args.sweep, prepared)  # refuses another model or other data
    path = Path(args.sweep) / "per_example.parquet"
    if not same or not path.is_file():
        if say:
            why = "other blocks of the data" if not same else "no per-example data"
            say(f"--sweep {args.sweep}: {why}; computing the exact ablations here")
        return
    try:
        table = pd.read_parquet(path)
    except Exception as err:
        raise ConfigError(
            f"{path} is damaged ({err}); re-run that sweep to rewrite it, or omit --sweep"
        ) from None
    if not set(PER_EXAMPLE_COLUMNS) <= set(table.columns):
        raise ConfigError(f"{path} lacks the per-example columns {PER_EXAMPLE_COLUMNS}")
    done = run_dir.done_parts()
    for n in (n for n in names if n.startswith("ablation:")):
        rows = table[(table["measure"] == n) & (table["metric"] == metric)]
        for ly, part in rows.groupby("layer", sort=True):
            if part_key(n, int(ly)) not in done:
                run_dir.save_part(part_key(n, int(ly)), part[PER_EXAMPLE_COLUMNS])


def _bar(args, total: int):
    if args.quiet or total <= 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="exact ablation", unit="ex", dynamic_ncols=True)


def run(args: argparse.Namespace) -> int:
    from headlab.analyses.compare import compare_parts, part_key, summarise
    from headlab.analyses.compare_plots import compare_figure

    say = status_printer(args)
    methods, names, reference = _check(args)
    prepared = prepared_inputs(args)
    n_heads = prepared.layout.n_layers * prepared.layout.n_heads
    k = min(args.top_k, n_heads)
    if k < args.top_k and say:
        say(f"--top-k {args.top_k} is more than the model's {n_heads} heads; using {n_heads}")
    targets = {}
    if args.off_target.strip() != "none":
        # fail fast on a target the tokenizer cannot build
        targets = off_target_targets(args, prepared, say)
    metric = args.metric or prepared.metrics[0]
    extra = {
        "methods": methods, "measures": names, "metric": metric, "sweep": args.sweep,
        "rollout_sources": args.rollout_sources, "attention_keys": args.attention_keys,
        "stats": {"bins": args.bins, "reservoir": args.reservoir},
    }  # fmt: skip
    run_dir = open_run(args, "compare", prepared, extra)
    layout, n = prepared.layout, len(prepared.eval)
    stats = None
    try:
        if _needs_stats(names):
            stats = run_stats(
                run_dir, prepared, bins=args.bins, reservoir=args.reservoir, seed=args.seed,
                batch_size=args.batch_size, on_status=say,
            )  # fmt: skip
        if args.sweep:
            _reuse_sweep(args, prepared, run_dir, names, metric, say)
        done = run_dir.done_parts()
        exact = [m for m in names if m.startswith("ablation:")]
        left = sum(part_key(m, ly) not in done for m in exact for ly in range(layout.n_layers))
        if say:
            say(f"measuring {', '.join(names)} on {n} examples ({metric})")
        bar = _bar(args, left * layout.n_heads * n)
        try:
            for part in compare_parts(
                prepared.model, prepared.eval, methods=methods, cheap=csv_list(args.measures),
                metric=metric, stats=stats, batch_size=args.batch_size, layout=layout,
                rollout_sources=args.rollout_sources, attention_keys=args.attention_keys, skip=done,
                on_forward=bar.update if bar is not None else None,
            ):  # fmt: skip
                run_dir.save_part(part.key, part.table)
        finally:
            if bar is not None:
                bar.close()
    except KeyboardInterrupt:
        run_dir.set_status("interrupted")
        raise
    result = summarise(
        run_dir.load_parts(), reference=reference, n_boot=args.bootstrap, k=k,
        ci=args.ci, seed=args.seed, order=names,
    )  # fmt: skip
    run_dir.save_table("per_example.parquet", result.per_example)
    run_dir.save_table("scores.parquet", result.scores)
    run_dir.save_table("agreement.csv", result.agreement)
    run_dir.save_table("pairs.csv", result.pairs)
    run_dir.save_figure("compare.png", compare_figure(result.scores, result.agreement))
    cost = None
    if targets:
        ref = reference.partition(":")[2] if reference.startswith("ablation:") else methods[0]
        cost = _off_target(args, prepared, result.scores, k, ref, metric, stats, targets)
        run_dir.save_table("off_target.csv", cost)
    summary = {
        r.measure: [round(r.spearman, 4), round(r.ci_low, 4), round(r.ci_high, 4),
                    round(r.topk_overlap, 4)]
        for r in result.agreement.itertuples()
    }  # fmt: skip
    run_dir.set_status("complete", reference=reference, agreement=summary)
    _print(result.agreement, result.pairs, cost)
    print(f"\nrun directory: {run_dir.path}")
    return 0


def _off_target(args, prepared, scores, k, method, metric, stats, targets) -> pd.DataFrame:
    """Ablate each measure's top-k heads (and k random ones) on this data and every target."""
    from headlab.analyses.cascade import off_target, random_heads

    selections = {}
    for name, g in scores.groupby("measure", sort=False):
        top = g.sort_values(["rank", "layer", "head"]).head(k)
        selections[name] = [(int(r.layer), int(r.head)) for r in top.itertuples()]
    selections["random"] = random_heads(prepared.layout, k, seed=args.seed)
    own = args.task or args.data
    here = f"{own} (eval blocks)"  # the blocks the heads were selected on
    cost = off_target(
        prepared.model, selections, {here: (prepared.eval, metric), **targets}, method=method,
        stats=stats, batch_size=args.batch_size, layout=prepared.layout,
    )  # fmt: skip
    cost = cost.rename(columns={"selected_on": "selected_by"})
    cost.insert(1, "selected_on", own)
    return cost


def _print(agreement: pd.DataFrame, pairs: pd.DataFrame, cost: pd.DataFrame | None) -> None:
    if agreement.empty:
        print("only one measure: nothing to compare")
        return
    r0 = agreement.iloc[0]
    print(
        f"Spearman ρ of |importance| with {r0.reference} over {r0.n_heads} heads "
        f"({r0.n_examples} examples, {r0.n_boot} bootstrap resamples), top-{r0.k} overlap:"
    )
    for r in agreement.itertuples():
        ci = "" if pd.isna(r.ci_low) else f" [{r.ci_low:+.2f}, {r.ci_high:+.2f}]"
        print(f"  {r.measure:<15} ρ = {r.spearman:+.3f}{ci}  top-{r.k} {r.topk_overlap:.2f}")
    others = pairs[pairs["measure"] != pairs["other"]].groupby("measure", sort=False)["spearman"]
    print("mean Spearman ρ with the other measures:")
    print("  " + ", ".join(f"{m} {v:+.2f}" for m, v in others.mean().items()))
    if cost is not None:
        print("\noff-target cost of ablating each measure's top-k heads (effect > 0 hurts):")
        for target, g in cost.groupby("target", sort=False):
            shown = ", ".join(f"{r.selected_by} {r.effect:+.3f}" for r in g.itertuples())
            print(f"  {target} ({g['metric'].iloc[0]}): {shown}")
