"""``headlab prune``: pruning curves (fraction of heads or attention neurons ablated vs damage)."""

from __future__ import annotations

import argparse

from headlab.cli.common import (
    add_data_args,
    add_executor_args,
    add_model_args,
    add_run_args,
    add_stats_args,
    csv_list,
    data_kwargs,
    float_list,
    int_list,
    job_kwargs,
)

NAME = "prune"
HELP = (
    "Pruning curves: ablate growing fractions of heads (or attention neurons) with each method on "
    "the same nested masks, in random, sweep or re-ranked order; reports the largest fraction "
    "removable within a tolerance."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    # every head is ablated several times over: a default size that finishes in minutes
    add_data_args(p, n_blocks=4)
    g = p.add_argument_group("prune")
    g.add_argument("--unit", default="head", choices=["head", "neuron"], help="what is pruned")
    g.add_argument("--method", default="zero,mean,peak,resample", help="comma-separated methods")
    g.add_argument(
        "--order",
        default="random,sweep",
        help="comma-separated: random (nested masks per seed), sweep (least important first), "
        "iterative (re-rank after every step; costly: about n_heads forwards per step)",
    )
    g.add_argument(
        "--fractions",
        type=float_list,
        default=[round(0.1 * i, 2) for i in range(11)],
        help="fractions pruned, in [0, 1] (0 is always added)",
    )
    g.add_argument("--seeds", type=int_list, default=[0, 1, 2], help="seeds of the random order")
    g.add_argument(
        "--metric", default=None, help="comma-separated (default: ce,top1; tasks: theirs)"
    )
    g.add_argument("--rank-metric", default=None, help="metric ranking heads (default: the first)")
    g.add_argument(
        "--tolerance",
        type=float,
        default=0.1,
        help="largest harm allowed, in units of the first metric (e.g. 0.1 nats of CE)",
    )
    g.add_argument(
        "--sweep",
        default=None,
        metavar="DIR",
        help="a headlab sweep run to rank by (each method by its own rows where the sweep has "
        "them); without it the first --method is swept here and ranks every method",
    )
    add_stats_args(p)
    add_run_args(p)
    add_executor_args(p)


def run(args: argparse.Namespace) -> int:
    from headlab.jobs.prune import run_prune

    result = run_prune(
        **job_kwargs(args),
        **data_kwargs(args),
        unit=args.unit,
        methods=csv_list(args.method),
        orders=csv_list(args.order),
        fractions=args.fractions,
        seeds=args.seeds,
        metrics=csv_list(args.metric) if args.metric else None,
        rank_metric=args.rank_metric,
        tolerance=args.tolerance,
        sweep=args.sweep,
        bins=args.bins,
        reservoir=args.reservoir,
    )
    print_removable(result.removable)
    print(f"\nrun directory: {result.run_dir.path}")
    result.check_removable()  # exit status 2 when nothing is removable within the tolerance
    return 0


def print_removable(removable) -> None:
    """One line per (order, method): the largest fraction within the tolerance."""
    import pandas as pd

    r0 = removable.iloc[0]
    print(f"largest fraction pruned with harm <= {r0.tolerance:g} {r0.metric}:")
    for r in removable.itertuples():
        nxt = "" if pd.isna(r.next_fraction) else f" (at {r.next_fraction:g}: +{r.next_effect:.4g})"
        print(f"  {r.order:>9} {r.method:>9}: {r.fraction:g}  [{r.n_pruned} units]{nxt}")
