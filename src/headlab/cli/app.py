"""``headlab`` entry point. Each subcommand is one module in this package exposing
``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from headlab.errors import HeadlabError

#: subcommand modules, in the order ``--help`` lists them
COMMANDS = (
    "demo",
    "sweep",
    "estimate",
    "prune",
    "cascade",
    "shift",
    "detect",
    "compare",
    "gate",
    "l0",
    "steer",
    "attention",
    "report",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="headlab",
        description="Find which attention heads cause a behaviour, by intervening on them.",
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        mod = importlib.import_module(f"headlab.cli.{name}")
        p = sub.add_parser(
            mod.NAME,
            help=mod.HELP,
            description=mod.HELP,
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def _version() -> str:
    from headlab import __version__

    return f"headlab {__version__}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help, --version, or a usage error argparse already printed
        return done.code if isinstance(done.code, int) else 2
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    try:
        code = int(args._run(args) or 0)
        if code == 0 and getattr(args, "report", False):
            _report(args)
        return code
    except HeadlabError as err:
        print(f"headlab: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "\nheadlab: interrupted; results so far are saved. Re-run the same command to resume.",
            file=sys.stderr,
        )
        return 130


def _report(args: argparse.Namespace) -> None:
    """``--report`` (every command with a run directory): the head atlas of the run just
    written, as ``<out>/atlas.html``."""
    from pathlib import Path

    from headlab.cli.common import status
    from headlab.cli.report import print_result
    from headlab.jobs.report import run_report

    out = Path(args.out)
    print_result(run_report([out], out=out / "atlas.html", on_status=status(args)))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
