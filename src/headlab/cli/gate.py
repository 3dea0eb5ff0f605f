"""``headlab gate``: Causal Head Gating (three fits, taxonomy, validation) or its contrastive
variant (``--forget-task`` / ``--forget-data``), written to a resumable run directory.

The job is :func:`headlab.jobs.gate.run_gate`; this module only parses arguments and prints.
"""

from __future__ import annotations

import argparse

from headlab.cli.common import (
    add_data_args,
    add_executor_args,
    add_model_args,
    add_run_args,
    data_kwargs,
    job_kwargs,
    non_negative_int,
    positive_int,
)

NAME = "gate"
HELP = (
    "Causal Head Gating: fit one sigmoid gate per head of the frozen model three times (lam=0, "
    "then +lam keep pressure and -lam removal pressure) and label every head facilitating, "
    "interfering or irrelevant; --validate ablates the labelled heads against random ones. With "
    "--forget-task/--forget-data, contrastive CHG instead: keep the task, forget the other set."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from headlab.defaults import DEFAULT_GATE_MASKS, DEFAULT_GATE_STEPS

    add_model_args(p)
    add_data_args(p)
    g = p.add_argument_group("gate fits")
    g.add_argument(
        "--steps",
        type=positive_int("--steps"),
        default=DEFAULT_GATE_STEPS,
        help="Adam updates per fit (paper: 500; fewer keeps a default-model run on CPU short)",
    )
    g.add_argument(
        "--reg-steps",
        type=positive_int("--reg-steps"),
        default=None,
        help="updates of the +lam/-lam fits",
    )
    g.add_argument(
        "--lam",
        type=float,
        default=0.1,
        help="regularisation magnitude: loss = NLL - lam*mean(clip(theta,-4,4)); the fits use "
        "+lam (keep heads) and -lam (remove heads)",
    )
    g.add_argument(
        "--masks",
        type=positive_int("--masks"),
        default=DEFAULT_GATE_MASKS,
        help="masks fitted in parallel",
    )
    g.add_argument("--lr", type=float, default=None, help="Adam lr (CHG 1.0; contrastive 0.1)")
    g.add_argument("--threshold", type=float, default=0.5, help="gate level for 'high'")
    g.add_argument(
        "--official-start",
        action="store_true",
        help="start the +/-lam fits from the unclipped lam=0 theta, as the official code does",
    )
    c = p.add_argument_group(
        "contrastive CHG (keep --task/--data, forget this set)",
        "one fit from G~U(0,1) of loss = NLL_retain + mean_b max(sg(NLL_retain) - NLL_forget_b, "
        "-margin) - lam*mean(clip(theta,-4,4)), sg = stop-gradient (official defaults: lr 0.1 "
        "decaying to 0.01, margin 5); heads whose gate ends below --threshold are "
        "forget-specific",
    )
    src = c.add_mutually_exclusive_group()
    src.add_argument("--forget-task", default=None, metavar="NAME", help="task to forget")
    src.add_argument("--forget-data", default=None, metavar="NAME_OR_PATH", help="corpus to forget")
    c.add_argument(
        "--margin",
        type=float,
        default=5.0,
        help="forget term = mean_b max(NLL_retain - NLL_forget_b, -margin): each forget example "
        "is pushed until its NLL exceeds the retain NLL by margin nats, then left alone",
    )
    v = p.add_argument_group("validation")
    v.add_argument(
        "--validate",
        action="store_true",
        help="ablate labelled vs random heads (CHG: on the fitting sequences and on the held-out "
        "statistics split)",
    )
    v.add_argument("--k", type=positive_int("--k"), default=5, help="heads per ablated group")
    v.add_argument(
        "--random", type=non_negative_int("--random"), default=5, help="random groups (seeds)"
    )
    v.add_argument("--metric", default=None, help="validation metric (default: the task's)")
    add_run_args(p)
    add_executor_args(p)


def run(args: argparse.Namespace) -> int:
    from headlab.jobs.gate import run_gate

    result = run_gate(
        **job_kwargs(args),
        **data_kwargs(args),
        steps=args.steps,
        reg_steps=args.reg_steps,
        lam=args.lam,
        masks=args.masks,
        lr=args.lr,
        threshold=args.threshold,
        official_start=args.official_start,
        forget_task=args.forget_task,
        forget_data=args.forget_data,
        margin=args.margin,
        validate=args.validate,
        k=args.k,
        n_random=args.random,
        metric=args.metric,
    )
    print_summary(result)
    return 0


def print_summary(result, top: int = 8) -> None:
    """Label counts, the most facilitating / interfering heads, NLLs and validation."""
    t = result.table
    if result.mode == "chg":
        counts = t["label"].value_counts()
        print("\nCHG labels: " + ", ".join(f"{n} {c}" for n, c in counts.items()))
        for name, score in (("facilitating", "facilitating"), ("interfering", "interfering")):
            sub = t[t["label"] == name].sort_values(score, ascending=False).head(top)
            heads = " ".join(
                f"L{r.layer}.H{r.head}({r.g_minus:.2f}/{r.g_plus:.2f})" for r in sub.itertuples()
            )
            print(f"  {name} (G-/G+): {heads or '-'}")
        for split, part in result.summary.groupby("split", sort=False):
            nll = part.groupby("gates", sort=False)["nll"].mean()
            print(f"  NLL ({split}): " + ", ".join(f"{g} {v:.4f}" for g, v in nll.items()))
    else:
        sub = t[t["role"] == "forget-specific"].sort_values("g").head(top)
        print(
            f"\ncontrastive CHG: {int((t['role'] == 'forget-specific').sum())} forget-specific "
            "heads: "
            + (" ".join(f"L{r.layer}.H{r.head}({r.g:.2f})" for r in sub.itertuples()) or "-")
        )
        print(
            result.summary.groupby("gates", sort=False)
            .mean(numeric_only=True)
            .drop(columns="mask")
            .to_string(float_format=lambda x: f"{x:.4f}")
        )
    if result.validation is not None:
        from headlab.analyses.gates.validate import validation_summary

        print("\nvalidation (zero-ablation; effect > 0 means the metric got worse):")
        print(
            validation_summary(result.validation).to_string(
                index=False, float_format=lambda x: f"{x:.4f}"
            )
        )
    print(f"\nrun directory: {result.run_dir.path}")
