"""``headlab shift``: how far an ablation pushes the downstream activations out of distribution,
comparing methods on the top-k heads of a sweep."""

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
    job_kwargs,
    parse_heads,
    positive_int,
)

NAME = "shift"
HELP = (
    "Distribution shift under ablation: per downstream layer, residual-norm ratio to the clean "
    "run and fraction of activations beyond 3 sd of clean, plus output KL, for zero / mean / "
    "peak / resample on the top-k heads of a sweep."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    add_data_args(p)
    g = p.add_argument_group("shift")
    g.add_argument("--method", default="zero,mean,peak,resample", help="comma-separated methods")
    g.add_argument(
        "--top-k", type=positive_int("--top-k"), default=5, help="ablate the k most important heads"
    )
    g.add_argument(
        "--heads", type=parse_heads, default=None, metavar="L.H,...", help="these heads instead"
    )
    g.add_argument("--sweep", default=None, metavar="DIR", help="a headlab sweep run to rank by")
    g.add_argument(
        "--rank-method", default="zero", help="the sweep method whose ranking picks the heads"
    )
    g.add_argument("--each", action="store_true", help="also ablate each head alone")
    g.add_argument(
        "--skip-first", action="store_true", help="leave position 0 out of the residual measures"
    )
    add_stats_args(p)
    add_run_args(p)
    add_executor_args(p)


def run(args: argparse.Namespace) -> int:
    from headlab.jobs.shift import run_shift

    result = run_shift(
        **job_kwargs(args),
        **data_kwargs(args),
        methods=csv_list(args.method),
        top_k=args.top_k,
        heads=parse_heads(args.heads),
        sweep=args.sweep,
        rank_method=args.rank_method,
        each=args.each,
        skip_first=args.skip_first,
        bins=args.bins,
        reservoir=args.reservoir,
    )
    _print(result.table)
    print(f"\nrun directory: {result.run_dir.path}")
    return 0


def _print(table) -> None:
    """For the condition with the most heads: each method's largest departure and output KL."""
    target = table[table["n_heads"] == table["n_heads"].max()]["target"].iloc[0]
    sub = table[table["target"] == target]
    end, word = ("kl", "KL") if (sub["metric"] == "kl").any() else ("embed_cos", "embed_cos")
    print(f"ablating {target}: largest norm ratio, largest beyond-3sd fraction, output {word}")
    for method, g in sub.groupby("method", sort=False):
        nr = g[g["metric"] == "norm_ratio"]["value"]
        b3 = g[g["metric"] == "frac_3sigma"]["value"]
        kl = g[g["metric"] == end]["value"].iloc[0]
        far = nr.iloc[(nr - 1).abs().argmax()]
        print(f"  {method:>9}: norm ratio {far:.3f}  beyond 3sd {b3.max():.4f}  {word} {kl:.4f}")
