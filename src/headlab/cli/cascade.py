"""``headlab cascade``: remove heads one by one, re-ranking after every removal; flag backup heads;
then measure what removing those heads costs on other tasks and on corpus cross-entropy."""

from __future__ import annotations

import argparse

import pandas as pd

from headlab.cli.common import (
    add_data_args,
    add_model_args,
    add_run_args,
    add_stats_args,
    parse_heads,
    positive_int,
)
from headlab.cli.common import status as status_printer
from headlab.cli.shared import (
    load_parts,
    off_target_targets,
    open_run,
    prepared_inputs,
    run_stats,
)
from headlab.errors import ConfigError

NAME = "cascade"
HELP = (
    "Iterative removal in importance order with re-ranking after every removal; flags backup "
    "heads (whose effect jumps once another head is removed) and reports the off-target cost."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    # every head is ablated several times over: a default size that finishes in minutes
    add_data_args(p, n_blocks=4)
    g = p.add_argument_group("cascade")
    g.add_argument("--method", default="zero", help="ablation method (zero, mean, peak, ...)")
    g.add_argument("--metric", default=None, help="one metric (default: ce, or the task's own)")
    g.add_argument(
        "--steps", type=positive_int("--steps"), default=4, help="heads to remove (one round each)"
    )
    g.add_argument(
        "--heads",
        type=parse_heads,
        default=None,
        metavar="L.H,...",
        help="candidates (default: all)",
    )
    g.add_argument(
        "--share",
        type=float,
        default=0.25,
        help="backup: the rise must be at least this share of the trigger's own effect",
    )
    g.add_argument("--ratio", type=float, default=2.0, help="backup: and this many times larger")
    g.add_argument(
        "--off-target",
        default="auto",
        help="comma-separated targets for the off-target table: built-in tasks and/or corpora "
        "(CE); 'auto' = every other built-in task plus python-docs; 'none' to skip",
    )
    add_stats_args(p)
    add_run_args(p)


def run(args: argparse.Namespace) -> int:
    from headlab.analyses.cascade import (
        backup_heads,
        cascade_figure,
        cascade_steps,
        off_target,
        random_heads,
        removed_heads,
    )

    say = status_printer(args)
    if args.steps < 1:
        raise ConfigError(f"--steps must be at least 1, got {args.steps}")
    if not (args.share > 0 and args.ratio >= 1):
        raise ConfigError("--share must be > 0 and --ratio >= 1")
    prepared = prepared_inputs(args)
    # fail fast on a target this tokenizer cannot build
    targets = off_target_targets(args, prepared, say)
    metric = args.metric or prepared.metrics[0]
    heads = parse_heads(args.heads, prepared.layout)  # heads beyond the model: before any work
    extra = {
        "method": args.method, "metric": metric, "steps": args.steps,
        "heads": None if heads is None else [list(h) for h in heads],
        "stats": {"bins": args.bins, "reservoir": args.reservoir},
    }  # fmt: skip
    run_dir = open_run(args, "cascade", prepared, extra)
    try:
        stats = run_stats(
            run_dir, prepared, bins=args.bins, reservoir=args.reservoir, seed=args.seed,
            batch_size=args.batch_size, on_status=say,
        )  # fmt: skip
        done = _finished_rounds(run_dir)
        for step in cascade_steps(
            prepared.model, prepared.eval, method=args.method, metric=metric, steps=args.steps,
            heads=heads, stats=stats, removed=done, batch_size=args.batch_size,
            layout=prepared.layout,
        ):  # fmt: skip
            run_dir.save_part(step.key, step.table)
            if say:
                ly, h = step.removed_head
                say(f"round {step.step}: removed L{ly}.H{h}")
    except KeyboardInterrupt:
        run_dir.set_status("interrupted")
        raise
    table = load_parts(run_dir, "cascade-").sort_values(["step", "layer", "head"])
    table = table.reset_index(drop=True)
    backups = backup_heads(table, share=args.share, ratio=args.ratio)
    gone = removed_heads(table)
    run_dir.save_table("results.parquet", table)
    run_dir.save_table("backups.csv", backups)
    run_dir.save_figure("cascade.png", cascade_figure(table, share=args.share, ratio=args.ratio))
    if targets:
        selected_on = args.task or args.data
        selections = {
            selected_on: gone,
            "random": random_heads(
                prepared.layout, len(gone), seed=args.seed, exclude=gone, pool=heads
            ),
        }
        own_name = selected_on if selected_on not in targets else f"{selected_on} (eval blocks)"
        cost = off_target(
            prepared.model, selections, {own_name: (prepared.eval, metric), **targets},
            method=args.method,
            stats=stats, batch_size=args.batch_size, layout=prepared.layout,
        )  # fmt: skip
        run_dir.save_table("off_target.csv", cost)
    run_dir.set_status(
        "complete",
        removed=[list(h) for h in gone],
        backups=[[int(r.layer), int(r.head), int(r.trigger_layer), int(r.trigger_head)]
                 for r in backups.itertuples()],
    )  # fmt: skip
    _print(table, backups, gone)
    print(f"\nrun directory: {run_dir.path}")
    return 0


def _finished_rounds(run_dir) -> list[tuple[int, int]]:
    """The heads removed by the rounds already saved, in order. Each round builds on the ones
    before it, so the rounds after a missing one (a damaged part dropped on resume) are redone."""
    from headlab.analyses.cascade import removed_heads

    keys = sorted(k for k in run_dir.done_parts() if k.startswith("cascade-step"))
    n = next((i for i, k in enumerate(keys) if k != f"cascade-step{i:03d}"), len(keys))
    for key in keys[n:]:
        run_dir.drop_part(key, "follows a round that is recomputed")
    if n == 0:
        return []
    return removed_heads(pd.concat([run_dir.read_part(k) for k in keys[:n]], ignore_index=True))


def _print(table: pd.DataFrame, backups: pd.DataFrame, gone: list[tuple[int, int]]) -> None:
    picked = table[table["removed"]].sort_values("step")
    metric = table["metric"].iloc[0]
    print(f"removed in order ({table['method'].iloc[0]} ablation, effect on {metric}):")
    for r in picked.itertuples():
        print(f"  round {r.step}: L{r.layer}.H{r.head}  effect {r.effect:+.4f}")
    if backups.empty:
        print("no backup heads flagged")
    for r in backups.itertuples():
        print(
            f"  backup: L{r.layer}.H{r.head} effect {r.effect_before:+.4f} -> "
            f"{r.effect_after:+.4f} after L{r.trigger_layer}.H{r.trigger_head} was removed"
        )
