"""``headlab estimate``: cheap importance estimates for every head, optionally checked by exact
ablation of the top heads plus a random sample (``--exact-top``)."""

from __future__ import annotations

import argparse

from headlab.cli.common import (
    add_counterfactual_args,
    add_data_args,
    add_executor_args,
    add_model_args,
    add_run_args,
    csv_list,
    data_kwargs,
    job_kwargs,
    non_negative_int,
    positive_int,
)
from headlab.defaults import DEFAULT_BINS

NAME = "estimate"
HELP = (
    "Estimate every head's importance at once: attribution patching (atp:zero, atp:mean, "
    "atp:peak, atp:patch ...), Michel gradient importance, attention rollout; --exact-top K "
    "checks the estimate against exact ablation and reports the rank correlation."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    add_data_args(p)
    g = p.add_argument_group("estimate")
    g.add_argument(
        "--method",
        default="atp:zero,gradient,rollout",
        help="comma-separated: atp:zero, atp:mean, atp:median, atp:peak, atp:resample, "
        "atp:scale:ALPHA, atp:patch (--counterfactual pairs; a corpus without them: the "
        "statistics split), gradient, rollout, "
        "ig:METHOD[:STEPS] (layer-wise integrated gradients toward the same replacements, e.g. "
        "ig:zero:2; a trailing integer is the step count; costs about 3 x STEPS / heads-per-layer "
        "of an exact sweep)",
    )
    g.add_argument(
        "--metric",
        default=None,
        help="a metric with a gradient: ce, logit_diff, answer_logprob (default: ce for "
        "corpora, the task's own metric for tasks)",
    )
    g.add_argument(
        "--exact-top",
        type=non_negative_int("--exact-top"),
        default=0,
        metavar="K",
        help="also ablate the K heads with the largest estimates exactly (plus --n-random "
        "others) and report the Spearman correlation of estimate and exact effect",
    )
    g.add_argument(
        "--n-random",
        type=non_negative_int("--n-random"),
        default=10,
        help="random heads checked exactly",
    )
    g.add_argument(
        "--rollout-sources",
        default="context",
        choices=["context", "previous"],
        help="rollout: mass routed from the target position to positions 1..t-1 or to t-1",
    )
    g.add_argument(
        "--bins",
        type=positive_int("--bins"),
        default=DEFAULT_BINS,
        help="histogram bins for atp:peak",
    )
    add_counterfactual_args(
        p,
        extra=" estimate saves every estimate per example (per_example.parquet); with "
        "--exact-top, atp:patch is checked against exact patching from the same pairs.",
    )
    add_run_args(p)
    add_executor_args(p)
    p.add_argument("--top", type=positive_int("--top"), default=5, help="heads to print per method")


def run(args: argparse.Namespace) -> int:
    from headlab.jobs.estimate import run_estimate

    result = run_estimate(
        **job_kwargs(args),
        methods=csv_list(args.method),
        metrics=csv_list(args.metric) if args.metric else None,
        exact_top=args.exact_top,
        n_random=args.n_random,
        rollout_sources=args.rollout_sources,
        bins=args.bins,
        **data_kwargs(args),
    )
    print_summary(result, args.top)
    return 0


def print_summary(result, top: int) -> None:
    """Top heads per method and metric, the correlation check, and the run directory."""
    from headlab.analyses.sweep import rank_heads

    for (method, metric), g in rank_heads(result.table).groupby(["method", "metric"], sort=True):
        print(f"\n{method}, {metric}: top {top} heads")
        for r in g.head(top).itertuples():
            what = f"Δ{metric} ≈ {r.delta:+.4f}" if method.startswith("atp:") else f"{r.value:.4f}"
            print(f"  L{r.layer:>2}.H{r.head:<2}  {what}")
    if result.correlation is not None:
        print("\nestimate vs exact ablation (Spearman of |effect|):")
        for r in result.correlation.itertuples():
            print(
                f"  {r.method:<12} vs {r.exact_method} ablation, {r.exact_metric:<10} "
                f"all checked {r.spearman:+.3f} (n={r.n_checked}), "
                f"random sample {r.spearman_random:+.3f} (n={r.n_random})"
            )
    print(f"\nrun directory: {result.run_dir.path}")
