"""The ``headlab demo`` job: the main job on the embedded default model — every head of
SmolLM2-135M-Instruct swept on the induction task (loss on the repeated half), with statistics
from the python-docs corpus, under zero, mean and peak ablation."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from headlab.jobs.sweep import SweepResult, run_sweep

__all__ = ["DEMO_METHODS", "run_demo"]

DEMO_METHODS = ("zero", "mean", "peak")


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
) -> SweepResult:
    """Run the demo into ``out`` (resumable like every job); mirrors ``headlab demo``."""
    return run_sweep(
        out=out, task="induction", stats_data="python-docs", methods=list(methods), n_blocks=n,
        n_stats_blocks=16, seq_len=seq_len, batch_size=8, force=force, progress=progress,
        on_status=on_status, command=command,
    )  # fmt: skip
