"""``headlab detect``: previous-token, duplicate-token and induction scores for every head."""

from __future__ import annotations

import argparse

from headlab.cli.common import add_data_args, add_model_args, add_run_args, csv_list, positive_int
from headlab.cli.shared import open_run, prepared_inputs
from headlab.errors import ConfigError

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


def run(args: argparse.Namespace) -> int:
    from headlab.analyses.detect import DETECTORS, detect_figure, detect_heads

    detectors = csv_list(args.detector)
    for d in detectors:
        if d not in DETECTORS:
            raise ConfigError(f"unknown detector {d!r}; choose from {', '.join(DETECTORS)}")
    if not 0 <= args.threshold <= 1:
        raise ConfigError(f"--threshold must be in [0, 1], got {args.threshold}")
    overrides = {"task": "induction", "data": None} if args.task is None and not args.data else {}
    prepared = prepared_inputs(args, **overrides)
    extra = {
        "detectors": detectors, "measure": args.measure, "exclude_bos": args.exclude_bos,
        "exclude_current_token": args.exclude_current_token,
    }  # fmt: skip
    run_dir = open_run(args, "detect", prepared, extra)
    if "detect" in run_dir.done_parts():
        table = run_dir.load_parts()
    else:
        table = detect_heads(
            prepared.model, prepared.eval, detectors=detectors, measure=args.measure,
            exclude_bos=args.exclude_bos, exclude_current_token=args.exclude_current_token,
            batch_size=args.batch_size, layout=prepared.layout,
        )  # fmt: skip
        run_dir.save_part("detect", table)
    run_dir.save_table("results.parquet", table)
    run_dir.save_figure("detect.png", detect_figure(table, threshold=args.threshold))
    top = {}
    for metric, g in table.groupby("metric", sort=False):
        best = g.sort_values("value", ascending=False, kind="stable").head(args.top)
        top[metric] = [
            [int(r.layer), int(r.head), round(float(r.value), 4)] for r in best.itertuples()
        ]
    run_dir.set_status("complete", top_heads=top)
    for metric, rows in top.items():
        shown = ", ".join(f"L{ly}.H{h} {v:.3f}" for ly, h, v in rows)
        hits = int((table[table["metric"] == metric]["value"] > args.threshold).sum())
        print(f"{metric:>20}: {shown}  ({hits} above {args.threshold:g})")
    print(f"\nrun directory: {run_dir.path}")
    return 0
