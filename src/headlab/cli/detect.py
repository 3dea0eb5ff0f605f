"""``headlab detect``: previous-token, duplicate-token and induction scores for every head."""

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

NAME = "detect"
HELP = (
    "Head-type scores (TransformerLens detect_head conventions: previous-token, duplicate-token, "
    "induction; plus the ARENA diagonal induction score on repeated batches) as a layer x head "
    "table and heatmaps. Default data: the induction task."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    add_data_args(p, default_data=None)
    g = p.add_argument_group("detect")
    g.add_argument(
        "--detector",
        default="previous_token,duplicate_token,induction",
        help="comma-separated TransformerLens detectors",
    )
    g.add_argument(
        "--measure", default="mul", choices=["mul", "abs"], help="TransformerLens error measure"
    )
    g.add_argument("--exclude-bos", action="store_true", help="ignore attention to position 0")
    g.add_argument(
        "--exclude-current-token", action="store_true", help="ignore attention to the query itself"
    )
    g.add_argument("--threshold", type=float, default=0.4, help="score that counts as a detection")
    g.add_argument(
        "--top", type=positive_int("--top"), default=5, help="heads to print per detector"
    )
    add_run_args(p)
    add_executor_args(p)


def run(args: argparse.Namespace) -> int:
    from headlab.jobs.detect import run_detect

    result = run_detect(
        **job_kwargs(args),
        **data_kwargs(args),
        detectors=csv_list(args.detector),
        measure=args.measure,
        exclude_bos=args.exclude_bos,
        exclude_current_token=args.exclude_current_token,
        threshold=args.threshold,
        top=args.top,
    )
    print_summary(result)
    return 0


def print_summary(result) -> None:
    """The top heads of every detector, how many pass the threshold, and the run directory."""
    table, threshold = result.table, result.threshold
    for metric, rows in result.top_heads.items():
        shown = ", ".join(f"L{ly}.H{h} {v:.3f}" for ly, h, v in rows)
        hits = int((table[table["metric"] == metric]["value"] > threshold).sum())
        print(f"{metric:>20}: {shown}  ({hits} above {threshold:g})")
    print(f"\nrun directory: {result.run_dir.path}")
