"""``headlab prune``: pruning curves (fraction of heads or attention neurons ablated vs damage)."""

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
    float_list,
    int_list,
)
from headlab.cli.common import status as status_printer
from headlab.cli.shared import (
    load_parts,
    load_sweep,
    open_run,
    prepared_inputs,
    run_stats,
    saved_sweep,
)
from headlab.errors import ConfigError

NAME = "prune"
HELP = (
    "Pruning curves: ablate growing fractions of heads (or attention neurons) with each method on "
    "the same nested masks, in random, sweep or re-ranked order; reports the largest fraction "
    "removable within a tolerance."
)


# --- the command -------------------------------------------------------------------------------


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


def run(args: argparse.Namespace) -> int:
    from headlab.analyses.prune import (
        check_fractions,
        prune_figure,
        prune_parts,
        removable_fraction,
        summarize,
    )

    say = status_printer(args)
    methods, orders = csv_list(args.method), csv_list(args.order)
    fractions = check_fractions(args.fractions)
    check_options(methods, orders, args.unit)
    if not (args.tolerance >= 0):
        raise ConfigError(f"--tolerance must be >= 0 (metric units), got {args.tolerance}")
    if args.sweep and not (Path(args.sweep) / "manifest.json").is_file():
        raise ConfigError(f"--sweep {args.sweep} is not a finished headlab sweep run directory")
    prepared = prepared_inputs(args)
    metrics = csv_list(args.metric) if args.metric else (
        ["ce", "top1"] if args.task is None else prepared.metrics
    )  # fmt: skip
    rank = args.rank_metric or metrics[0]
    importance, same_blocks = None, None
    if args.sweep and "sweep" in orders:
        importance, same_blocks = load_sweep(args.sweep, prepared)
    extra = {
        "unit": args.unit, "methods": methods, "orders": orders, "fractions": fractions,
        "seeds": args.seeds, "metrics": metrics, "rank_metric": args.rank_metric,
        "sweep": args.sweep, "stats": {"bins": args.bins, "reservoir": args.reservoir},
    }  # fmt: skip
    run_dir = open_run(args, "prune", prepared, extra)
    try:
        stats = run_stats(
            run_dir, prepared, bins=args.bins, reservoir=args.reservoir, seed=args.seed,
            batch_size=args.batch_size, on_status=say,
        )  # fmt: skip
        if "sweep" in orders and importance is None:
            if say:
                say(f"no --sweep given: sweeping every head with {methods[0]} (saved in the run "
                    "directory); every method's sweep order uses that ranking")  # fmt: skip
            same_blocks = True
            importance = saved_sweep(
                run_dir, prepared, methods=methods[:1], metrics=[rank], stats=stats,
                batch_size=args.batch_size,
            )  # fmt: skip
        for part in prune_parts(
            prepared.model, prepared.eval, methods=methods, orders=orders, unit=args.unit,
            fractions=fractions, seeds=args.seeds, metrics=metrics, stats=stats,
            importance=importance, rank_metric=args.rank_metric, batch_size=args.batch_size,
            skip=run_dir.done_parts(), layout=prepared.layout,
        ):  # fmt: skip
            run_dir.save_part(part.key, part.table)
            if say:
                say(f"curve done: {part.order} / {part.method} / seed {part.seed}")
    except KeyboardInterrupt:
        run_dir.set_status("interrupted")
        raise
    table = load_parts(run_dir, "prune-")
    table = table.sort_values(["order", "method", "seed", "metric", "fraction"], kind="stable")
    table = table.reset_index(drop=True)
    run_dir.save_table("results.parquet", table)
    run_dir.save_table("summary.csv", summarize(table))
    removable = removable_fraction(table, args.tolerance, metric=metrics[0])
    run_dir.save_table("removable.csv", removable)
    run_dir.save_figure("prune.png", prune_figure(table))
    run_dir.set_status(
        "complete",
        removable={
            f"{r.order}/{r.method}": None if pd.isna(r.fraction) else r.fraction
            for r in removable.itertuples()
        },
        sweep_on_same_blocks=same_blocks,
    )
    print_removable(removable)
    print(f"\nrun directory: {run_dir.path}")
    removable_fraction(table, args.tolerance, metric=metrics[0], strict=True)
    return 0


def check_options(methods: list[str], orders: list[str], unit: str) -> None:
    """Refuse unknown methods, unknown orders and importance orders on neurons before any work."""
    from headlab.analyses.prune import ORDERS
    from headlab.interventions import intervention_from_name

    if not methods:
        raise ConfigError("give at least one --method")
    for m in methods:
        intervention_from_name(m)
    for o in orders:
        if o not in ORDERS:
            raise ConfigError(f"unknown pruning order {o!r}; choose from {', '.join(ORDERS)}")
        if o != "random" and unit != "head":
            raise ConfigError(f"order {o!r} ranks whole heads; use --unit head or --order random")


def print_removable(removable: pd.DataFrame) -> None:
    """One line per (order, method): the largest fraction within the tolerance."""
    r0 = removable.iloc[0]
    print(f"largest fraction pruned with harm <= {r0.tolerance:g} {r0.metric}:")
    for r in removable.itertuples():
        nxt = "" if pd.isna(r.next_fraction) else f" (at {r.next_fraction:g}: +{r.next_effect:.4g})"
        print(f"  {r.order:>9} {r.method:>9}: {r.fraction:g}  [{r.n_pruned} units]{nxt}")
