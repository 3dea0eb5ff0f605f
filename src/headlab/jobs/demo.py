"""The ``headlab demo`` job: the main job on the embedded default model — every head of
SmolLM2-135M-Instruct swept on the induction task (loss on the repeated half), with statistics
from the python-docs corpus, under zero, mean and peak ablation — ending with the run's head
atlas, ``<out>/atlas.html``."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from headlab.defaults import DEFAULT_N_STATS_BLOCKS
from headlab.jobs.sweep import SweepResult, run_sweep

__all__ = ["ATLAS", "DEMO_METHODS", "run_demo"]

DEMO_METHODS = ("zero", "mean", "peak")
#: the demo's head atlas, inside its run directory
ATLAS = "atlas.html"


def run_demo(
    *,
    out: str | os.PathLike[str] = "runs/demo",
    methods: Sequence[str] = DEMO_METHODS,
    n: int = 4,
    seq_len: int = 41,
    force: bool = False,
    progress: bool = False,
    on_status: Callable[[str], None] | None = None,
    command: list[str] | None = None,
    report: bool = True,
) -> SweepResult:
    """Run the demo into ``out`` (resumable like every job) and, with ``report``, write its head
    atlas ``<out>/atlas.html`` (:func:`headlab.jobs.report.run_report`); mirrors
    ``headlab demo``."""
    result = run_sweep(
        out=out, task="induction", stats_data="python-docs", methods=list(methods), n_blocks=n,
        n_stats_blocks=DEFAULT_N_STATS_BLOCKS, seq_len=seq_len, batch_size=8, force=force,
        progress=progress, on_status=on_status, command=command,
    )  # fmt: skip
    if report:
        from headlab.jobs.report import run_report

        run_report([out], out=Path(out) / ATLAS, on_status=on_status)
    return result
