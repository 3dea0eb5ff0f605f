"""``headlab demo``: the main job end to end on the embedded default model."""

from __future__ import annotations

import argparse
import time

NAME = "demo"
HELP = (
    "Sweep every head of SmolLM2-135M-Instruct on the induction task (statistics from the "
    "python-docs corpus) under zero, mean and peak ablation; prints the top heads and writes "
    "the run's head atlas (atlas.html in --out)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from headlab.cli.common import positive_int

    p.add_argument("--out", default="runs/demo", metavar="DIR", help="run directory")
    p.add_argument("--force", action="store_true", help="overwrite --out")
    p.add_argument("--method", default="zero,mean,peak", help="methods to compare")
    p.add_argument("--n", type=positive_int("--n"), default=4, help="induction sequences")
    p.add_argument(
        "--seq-len",
        type=positive_int("--seq-len"),
        default=41,
        help="tokens per sequence (1 + 2 x 20)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from headlab.cli.common import csv_list, status
    from headlab.cli.sweep import print_summary
    from headlab.jobs.base import command_line
    from headlab.jobs.demo import ATLAS, run_demo

    start = time.perf_counter()
    result = run_demo(
        out=args.out, methods=csv_list(args.method), n=args.n, seq_len=args.seq_len,
        force=args.force, progress=not args.quiet, on_status=status(args), command=command_line(),
    )  # fmt: skip
    print("\nheadlab demo: SmolLM2-135M-Instruct, induction task (loss on the repeated half)")
    print_summary(result, top=5)
    print(f"atlas: {result.run_dir.path / ATLAS} (open it in a browser; it works offline)")
    print(f"wall time: {time.perf_counter() - start:.0f} s")
    return 0
