"""``headlab compare``: how well cheap importance measures (attribution patching, gradient
importance, attention rollout, raw attention) agree with exact ablation, on the same examples."""

from __future__ import annotations

import argparse

from headlab.cli.common import (
    add_counterfactual_args,
    add_data_args,
    add_executor_args,
    add_model_args,
    add_run_args,
    add_stats_args,
    csv_list,
    data_kwargs,
    job_kwargs,
    non_negative_int,
    positive_int,
)

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
        help="exact single-head ablations (measures ablation:METHOD; patch: exact patching "
        "from --counterfactual); the first is the reference",
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
    add_counterfactual_args(
        p,
        extra=" compare: --methods patch measures exact patching from the pairs, atp:patch (or "
        "atp with patch among --methods) its attribution-patching estimate, on the same examples.",
    )
    add_run_args(p)
    add_executor_args(p)


def run(args: argparse.Namespace) -> int:
    from headlab.jobs.compare import run_compare

    result = run_compare(
        **job_kwargs(args),
        methods=csv_list(args.methods),
        measures=csv_list(args.measures),
        metric=args.metric,
        reference=args.reference,
        bootstrap=args.bootstrap,
        ci=args.ci,
        top_k=args.top_k,
        sweep=args.sweep,
        rollout_sources=args.rollout_sources,
        attention_keys=args.attention_keys,
        off_target=args.off_target,
        bins=args.bins,
        reservoir=args.reservoir,
        **data_kwargs(args),
    )
    print_summary(result)
    return 0


def print_summary(result) -> None:
    """Agreement with the reference, mean agreement between measures, the off-target cost, and
    the run directory."""
    import pandas as pd

    agreement, pairs, cost = result.agreement, result.pairs, result.off_target
    if agreement.empty:
        print("only one measure: nothing to compare")
    else:
        r0 = agreement.iloc[0]
        print(
            f"Spearman ρ of |importance| with {r0.reference} over {r0.n_heads} heads "
            f"({r0.n_examples} examples, {r0.n_boot} bootstrap resamples), recall of its top-{r0.k}"
            ", cost in forward passes per example (share of the exact sweep's):"
        )
        for r in agreement.itertuples():
            ci = "" if pd.isna(r.ci_low) else f" [{r.ci_low:+.2f}, {r.ci_high:+.2f}]"
            fwd = "" if pd.isna(r.cost) else f"  cost {r.cost:.3g} ({r.cost_fraction:.1%})"
            print(f"  {r.measure:<15} ρ = {r.spearman:+.3f}{ci}  recall@{r.k} {r.recall:.2f}{fwd}")
        others = pairs[pairs["measure"] != pairs["other"]].groupby("measure", sort=False)
        print("mean Spearman ρ with the other measures:")
        print("  " + ", ".join(f"{m} {v:+.2f}" for m, v in others["spearman"].mean().items()))
        if cost is not None:
            print("\noff-target cost of ablating each measure's top-k heads (effect > 0 hurts):")
            for target, g in cost.groupby("target", sort=False):
                shown = ", ".join(f"{r.selected_by} {r.effect:+.3f}" for r in g.itertuples())
                print(f"  {target} ({g['metric'].iloc[0]}): {shown}")
    print(f"\nrun directory: {result.run_dir.path}")
