"""``headlab report``: the head atlas of some run directories, one offline HTML file."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from headlab.jobs.report import ReportResult

NAME = "report"
HELP = (
    "Write the head atlas of one or more run directories of one model (any command): one "
    "self-contained HTML file with heatmaps, a card per head, a ranking and the analyses, which "
    "opens offline."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories (the --out of commands)")
    p.add_argument(
        "--out",
        default=None,
        metavar="FILE",
        help="the HTML file to write (default: atlas.html in the first RUN)",
    )
    p.add_argument(
        "--no-model",
        action="store_true",
        help="do not load the model (no attention patterns or promoted tokens; faster)",
    )
    p.add_argument("--quiet", action="store_true", help="no status lines")


def run(args: argparse.Namespace) -> int:
    from headlab.cli.common import status
    from headlab.jobs.report import run_report

    result = run_report(args.runs, out=args.out, model=not args.no_model, on_status=status(args))
    print_result(result)
    return 0


def print_result(result: ReportResult) -> None:
    """The summary lines every command prints after writing an atlas."""
    for note in result.notes:
        print(f"note: {note}")
    if result.unfinished:
        print(f"unfinished runs (shown as far as they got): {', '.join(result.unfinished)}")
    print(
        f"atlas: {result.path} ({result.size / 1e6:.1f} MB; {len(result.runs)} run"
        f"{'s' if len(result.runs) != 1 else ''}, {result.n_layers} x {result.n_heads} heads)"
    )
