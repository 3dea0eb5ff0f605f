"""``headlab sweep``: ablate each head alone under each method and record what changes."""

from __future__ import annotations

import argparse

from headlab.cli.common import (
    add_data_args,
    add_executor_args,
    add_model_args,
    add_run_args,
    csv_list,
    data_kwargs,
    executor_kwargs,
    non_negative_int,
    parse_heads,
    positive_int,
    status,
)

NAME = "sweep"
HELP = (
    "Ablate every head alone under each method (zero, mean, peak, median, resample, scale:ALPHA) "
    "and record the change in each metric; writes a resumable run directory."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    add_data_args(p)
    g = p.add_argument_group("sweep")
    g.add_argument(
        "--method",
        default="zero,mean,peak",
        help="comma-separated: zero, mean, median, peak, peak:kde[:BW], "
        "resample[:SEED], scale:ALPHA (e.g. scale:-1, scale:5)",
    )
    g.add_argument(
        "--metric",
        default=None,
        help="comma-separated: ce, top1, topK, kl, logit_diff, answer_logprob, "
        "answer_acc (default: ce for corpora, the task's own metric for tasks)",
    )
    g.add_argument(
        "--heads",
        type=parse_heads,
        default=None,
        metavar="L.H,...",
        help="only these heads (default: all)",
    )
    g.add_argument(
        "--bins",
        type=positive_int("--bins"),
        default=1000,
        help="histogram bins for peak and median",
    )
    g.add_argument(
        "--reservoir",
        type=non_negative_int("--reservoir"),
        default=16,
        help="statistics inputs kept as donors for resample ablation",
    )
    add_run_args(p)
    add_executor_args(p)
    p.add_argument("--top", type=positive_int("--top"), default=5, help="heads to print per method")


def run(args: argparse.Namespace) -> int:
    from headlab.jobs.base import command_line
    from headlab.jobs.sweep import run_sweep

    result = run_sweep(
        out=args.out,
        methods=csv_list(args.method),
        metrics=csv_list(args.metric) if args.metric else None,
        heads=parse_heads(args.heads),
        bins=args.bins,
        reservoir=args.reservoir,
        batch_size=args.batch_size,
        force=args.force,
        **executor_kwargs(args),
        progress=not args.quiet,
        on_status=status(args),
        command=command_line(),
        **data_kwargs(args),
    )
    print_summary(result, args.top)
    return 0


def print_summary(result, top: int) -> None:
    """Top heads per method and metric, then where the run directory is."""
    for (method, metric), g in result.ranking.groupby(["method", "metric"], sort=True):
        base = g["baseline"].iloc[0]
        print(f"\n{method} ablation, {metric} (clean {base:.4f}): top {top} heads by effect")
        for r in g.head(top).itertuples():
            spread = f" ± {r.delta_se:.4f}" if r.delta_se == r.delta_se else ""
            print(f"  L{r.layer:>2}.H{r.head:<2}  Δ{metric} = {r.delta:+.4f}{spread}")
    print(f"\nrun directory: {result.run_dir.path}")
