"""``headlab l0``: hard-concrete L0 head gates (Voita et al. 2019) swept over the penalty weight.

The job is :func:`headlab.jobs.l0.run_l0`; this module only parses arguments and prints.
"""

from __future__ import annotations

import argparse

from headlab.cli.common import (
    add_data_args,
    add_executor_args,
    add_model_args,
    add_run_args,
    csv_list,
    data_kwargs,
    job_kwargs,
    positive_int,
)

NAME = "l0"
HELP = (
    "Hard-concrete L0 gates (Voita et al. 2019) on the frozen model: for each penalty weight "
    "lam, fit one stochastic gate per head against NLL + lam * (expected open heads per layer), "
    "then evaluate with deterministic gates; reports heads kept vs the metric and the kept set."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from headlab.defaults import DEFAULT_L0_LAMBDAS, DEFAULT_L0_STEPS

    add_model_args(p)
    add_data_args(p)
    g = p.add_argument_group("L0 gates")
    g.add_argument(
        "--lam",
        default=",".join(f"{lam:g}" for lam in DEFAULT_L0_LAMBDAS),
        metavar="L1,L2,...",
        help="penalty weights to sweep (>= 0); loss = NLL + lam * sum_heads P(gate != 0) / layers",
    )
    g.add_argument(
        "--steps",
        type=positive_int("--steps"),
        default=DEFAULT_L0_STEPS,
        help="Adam updates per weight",
    )
    g.add_argument("--lr", type=float, default=0.3, help="Adam learning rate of log alpha")
    g.add_argument(
        "--samples", type=positive_int("--samples"), default=1, help="gate samples per update"
    )
    g.add_argument("--metric", default=None, help="evaluation metric (default: the task's)")
    add_run_args(p)
    add_executor_args(p)


def parse_lams(text: str) -> list[float]:
    """``"0.01,0.1,1"`` -> ``[0.01, 0.1, 1.0]`` (a clear error for anything else)."""
    from headlab.errors import ConfigError

    out = []
    for item in csv_list(text):
        try:
            out.append(float(item))
        except ValueError:
            raise ConfigError(
                f"--lam takes numbers separated by commas (e.g. 0.01,0.1,1), got {item!r}"
            ) from None
    return out


def run(args: argparse.Namespace) -> int:
    from headlab.jobs.l0 import run_l0

    result = run_l0(
        **job_kwargs(args),
        **data_kwargs(args),
        lams=parse_lams(args.lam),
        steps=args.steps,
        lr=args.lr,
        samples=args.samples,
        metric=args.metric,
    )
    print_summary(result)
    return 0


def print_summary(result, top: int = 12) -> None:
    """Heads kept and the metric per penalty weight, and the smallest kept sets."""
    t = result.table
    print(f"\nL0 gates: {t['metric'].iloc[0]} with all heads {t['baseline'].iloc[0]:.4f}")
    cols = ["lam", "n_kept", "value", "value_binary", "delta", "value_heldout"]
    print(t[[c for c in cols if c in t]].to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    if "baseline_heldout" in t:
        print(f"  (held-out split: {t['baseline_heldout'].iloc[0]:.4f} with all heads)")
    for lam in t.sort_values("n_kept")["lam"].head(2):
        kept = result.heads[(result.heads["lam"] == lam) & result.heads["kept"]]
        heads = " ".join(f"L{r.layer}.H{r.head}" for r in kept.head(top).itertuples())
        more = f" ... (+{len(kept) - top})" if len(kept) > top else ""
        print(f"  kept at lam={lam:g}: {heads or '-'}{more}")
    print(f"\nrun directory: {result.run_dir.path}")
