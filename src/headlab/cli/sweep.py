"""``headlab sweep``: ablate each head alone under each method and record what changes."""

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
    parse_heads,
    positive_int,
)
from headlab.defaults import DEFAULT_BINS

NAME = "sweep"
HELP = (
    "Ablate every head alone under each method (zero, mean, peak, median, resample, scale:ALPHA, "
    "patch from --counterfactual pairs) and record the change in each metric; writes a "
    "resumable run directory."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    add_data_args(p)
    g = p.add_argument_group("sweep")
    g.add_argument(
        "--method",
        default="zero,mean,peak",
        help="comma-separated: zero, mean, median, peak (KDE peak), peak:hist (fullest bin), "
        "peak:kde[:BW], resample[:SEED], scale:ALPHA (e.g. scale:-1, scale:5), patch (each "
        "head's output on the paired corrupted input: --counterfactual)",
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
        default=DEFAULT_BINS,
        help="histogram bins for peak and median",
    )
    g.add_argument(
        "--reservoir",
        type=non_negative_int("--reservoir"),
        default=16,
        help="statistics inputs kept as donors for resample ablation",
    )
    add_counterfactual_args(p)
    add_top_k_args(p)
    add_run_args(p)
    add_executor_args(p)
    p.add_argument("--top", type=positive_int("--top"), default=5, help="heads to print per method")


def add_top_k_args(p: argparse.ArgumentParser) -> None:
    """``--top-k`` and its options: the exact top-k search (docs/topk.md)."""
    g = p.add_argument_group(
        "top-k search",
        "find the K heads with the largest exact effect without evaluating every head on every "
        "example: heads race over growing random subsets of the examples and stop once an "
        "interval shows they cannot enter (or leave) the top K (docs/topk.md)",
    )
    g.add_argument(
        "--top-k",
        type=positive_int("--top-k"),
        default=None,
        metavar="K",
        help="return the K heads of largest exact effect per method and metric (none: the full "
        "sweep)",
    )
    g.add_argument(
        "--confidence",
        type=_probability,
        default=0.95,
        help="probability that the whole top-K answer is right",
    )
    g.add_argument(
        "--direction",
        choices=["abs", "hurts", "helps"],
        default="abs",
        help="rank by |delta| (abs), by harm when ablated (hurts: the sweep's effect), or by "
        "improvement (helps)",
    )
    g.add_argument(
        "--max-cost",
        type=_fraction,
        default=None,
        metavar="FRACTION",
        help="stop once the search would pass this fraction of the full sweep's forward passes; "
        "heads not decided by then are reported as undecided (none: no limit, the answer is "
        "then always decided or exact)",
    )
    g.add_argument(
        "--range-factor",
        type=_at_least_one,
        default=1.0,
        help="the assumption behind the intervals: a head's per-example changes over all "
        "examples span at most this times its spread (range plus largest magnitude) on the "
        "examples seen, or more where heads evaluated on every example show it (larger is "
        "safer and slower)",
    )


def _number(option: str, ok, words: str):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{option} must be {words}, got {text}")
        return value

    parse.__name__ = words
    return parse


_probability = _number("--confidence", lambda v: 0 < v < 1, "a number strictly between 0 and 1")
_fraction = _number("--max-cost", lambda v: 0 < v <= 1, "a fraction in (0, 1]")
_at_least_one = _number("--range-factor", lambda v: 1 <= v < float("inf"), "a number >= 1")


def run(args: argparse.Namespace) -> int:
    from headlab.jobs.sweep import run_sweep

    result = run_sweep(
        **job_kwargs(args),
        methods=csv_list(args.method),
        metrics=csv_list(args.metric) if args.metric else None,
        heads=parse_heads(args.heads),
        bins=args.bins,
        reservoir=args.reservoir,
        top_k=args.top_k,
        confidence=args.confidence,
        direction=args.direction,
        max_cost=args.max_cost,
        range_factor=args.range_factor,
        **data_kwargs(args),
    )
    if result.search is not None:
        print_top_k(result)
    else:
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


def print_top_k(result) -> None:
    """The K heads per method and metric with their intervals, what decided them, the cost
    against the full sweep, and any undecided heads with the examples that would decide them."""
    info = result.search
    rule, cost = info["rule"], info["cost"]
    word = {"abs": "|Δ|", "hurts": "harm when ablated", "helps": "improvement when ablated"}
    for (method, metric), g in result.ranking.groupby(["method", "metric"], sort=True):
        s = info["summary"][f"{method}/{metric}"]
        if not s["guaranteed"]:
            how = "NOT decided (budget spent): undecided heads below"
        elif s["statistical"]:
            how = (
                f"right with probability >= {rule['confidence']:g} under the range assumption "
                "(docs/topk.md)"
            )
        else:
            how = "exact (every head that mattered ran on every example)"
        print(f"\n{method} ablation, {metric}: top {rule['k']} heads by {word[rule['direction']]}"
              f" — {how}")  # fmt: skip
        for r in g[g["in_top_k"]].itertuples():
            span = "exact" if r.lo == r.hi else f"in [{r.lo:+.4f}, {r.hi:+.4f}]"
            print(f"  L{r.layer:>2}.H{r.head:<2}  Δ{metric} = {r.delta:+.4f} {span}  "
                  f"({r.n} examples, {r.status})")  # fmt: skip
        for r in g[g["status"] == "undecided"].itertuples():
            print(f"  undecided: L{r.layer}.H{r.head} after {r.n} examples; about {r.n_needed} "
                  "would decide it (raise --max-cost, or drop it for an answer decided by "
                  "intervals or exact values)")  # fmt: skip
    print(f"\ncost: {cost['search_tokens']:.3g} forward-pass tokens, "
          f"{cost['fraction']:.1%} of the full sweep's {cost['sweep_tokens']:.3g}")  # fmt: skip
    print(f"run directory: {result.run_dir.path}")
