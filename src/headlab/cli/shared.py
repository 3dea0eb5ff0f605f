"""TEMPORARY shim, removed by the job-layer redesign: the old home of the job helpers
that several commands share (now in ``headlab.jobs``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

import pandas as pd

from headlab.cli.common import csv_list, data_kwargs
from headlab.cli.common import status as status_printer
from headlab.errors import ConfigError
from headlab.jobs import Inputs, Prepared, prepare
from headlab.jobs.sweep import load_sweep as load_sweep
from headlab.jobs.sweep import saved_sweep as saved_sweep
from headlab.runs import RunDir
from headlab.stats import Stats, StatsConfig, collect_stats


def prepared_inputs(args: argparse.Namespace, **overrides: Any) -> Prepared:
    """Load the model and data named by the shared CLI options."""
    kw = {**data_kwargs(args), **overrides}
    return prepare(Inputs(**kw), on_status=status_printer(args))


def open_run(
    args: argparse.Namespace, kind: str, prepared: Prepared, extra: dict[str, Any]
) -> RunDir:
    """Open (or resume) ``args.out`` for a ``kind`` run of ``prepared`` with options ``extra``."""
    identity = {**prepared.identity(), **extra}
    run = RunDir.open(
        args.out, kind=kind, identity=identity, command=["headlab", *sys.argv[1:]],
        force=args.force, on_status=status_printer(args),
    )  # fmt: skip
    if not run.file("tokens.safetensors").is_file():
        run.save_tokens(prepared.eval)
    return run


def run_stats(
    run: RunDir,
    prepared: Prepared,
    *,
    bins: int,
    reservoir: int,
    seed: int,
    batch_size: int,
    on_status: Callable[[str], None] | None = None,
) -> Stats:
    """The run's activation statistics: loaded from the run directory, else collected and saved."""
    path = run.verified("stats.safetensors")
    if path is not None:
        return Stats.load(path, model=prepared.model)
    if on_status:
        on_status(f"collecting statistics on {len(prepared.stats_batch)} inputs")
    config = StatsConfig(bins=bins, reservoir=min(reservoir, len(prepared.stats_batch)), seed=seed)
    stats = collect_stats(
        prepared.model, prepared.stats_batch, config=config, batch_size=batch_size
    )
    with run.atomic("stats.safetensors") as tmp:
        stats.save(tmp)
    return stats


def load_parts(run: RunDir, prefix: str) -> pd.DataFrame:
    """The concatenated parts of ``run`` whose keys start with ``prefix``."""
    table = run.load_parts(prefix)  # each part checked against its checksum
    if table is None:
        raise ConfigError(f"run directory {run.path} has no {prefix}* parts")
    return table


def off_target_targets(
    args: argparse.Namespace, prepared: Prepared, say: Callable[[str], None] | None
) -> dict[str, tuple]:
    """Targets of ``--off-target``: built-in tasks (their own metric) and corpora (CE), each as
    ``{name: (batch, metric)}``; ``auto`` = every other built-in task plus python-docs."""
    from headlab.data.blocks import make_blocks
    from headlab.data.corpora import load_texts
    from headlab.data.tasks import TASKS, load_task

    spec = args.off_target.strip()
    if spec == "none":
        return {}
    auto = spec == "auto"
    names = [t for t in TASKS if t != args.task] + ["python-docs"] if auto else csv_list(spec)
    out: dict[str, tuple] = {}
    n = args.n_blocks
    for name in names:
        try:
            if name in TASKS:
                task = load_task(name, prepared.tokenizer, n=n, seed=args.seed)
                out[name] = (task.eval, task.metric)
            else:
                batch, _ = make_blocks(
                    prepared.tokenizer, load_texts(name), seq_len=args.seq_len or 64, n_blocks=n,
                    seed=args.seed + 7,
                )  # fmt: skip
                out[name] = (batch, "ce")
        except ConfigError as err:
            if not auto:
                raise
            if say:
                say(f"off-target: skipping {name} ({err})")
    return out
