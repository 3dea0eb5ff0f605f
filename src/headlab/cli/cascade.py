"""``headlab cascade``: remove heads one by one, re-ranking after every removal; flag backup heads;
then measure what removing those heads costs on other tasks and on corpus cross-entropy."""

from __future__ import annotations

import argparse

from headlab.cli.common import (
    add_data_args,
    add_executor_args,
    add_model_args,
    add_run_args,
    add_stats_args,
    data_kwargs,
    job_kwargs,
    parse_heads,
    positive_int,
)

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
    add_executor_args(p)


def run(args: argparse.Namespace) -> int:
    from headlab.jobs.cascade import run_cascade

    result = run_cascade(
        **job_kwargs(args),
        **data_kwargs(args),
        method=args.method,
        metric=args.metric,
        steps=args.steps,
        heads=parse_heads(args.heads),
        share=args.share,
        ratio=args.ratio,
        off_target=args.off_target,
        bins=args.bins,
        reservoir=args.reservoir,
    )
    _print(result.table, result.backups)
    print(f"\nrun directory: {result.run_dir.path}")
    return 0


def _print(table, backups) -> None:
    """The heads removed, round by round, then the backup heads flagged."""
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
