"""The ``headlab shift`` job: distribution shift under ablation of the top-k heads of a sweep (or
given heads), one part per method (``shift-METHOD``; a ``sweep-*`` sweep when neither ``--heads``
nor ``--sweep`` is given), into a resumable run directory (``results.parquet``, ``shift.png``)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pandas as pd
from matplotlib.figure import Figure

from headlab.analyses.shift import ShiftPart, shift_plan
from headlab.defaults import DEFAULT_BINS, DEFAULT_N_STATS_BLOCKS
from headlab.errors import ConfigError
from headlab.heads import Head, check_heads, top_heads
from headlab.interventions import intervention_from_name
from headlab.jobs.base import (
    check_count,
    execute,
    identity_of,
    job_stats,
    load_parts,
    needs_stats,
    open_run,
    stats_config,
)
from headlab.jobs.executors import Executor, make_executor
from headlab.jobs.inputs import Inputs, Prepared, prepare
from headlab.jobs.sweep import load_sweep, saved_sweep
from headlab.models.load import DEFAULT_MODEL
from headlab.plots.shift import shift_figure
from headlab.runs import RunDir

__all__ = ["ShiftResult", "run_shift"]


@dataclass
class ShiftResult:
    """What :func:`run_shift` produced: the tidy table of every condition and the heads
    ablated."""

    table: pd.DataFrame
    heads: list[Head]
    run_dir: RunDir
    figures: dict[str, Figure] = field(default_factory=dict, repr=False)


def run_shift(
    *,
    out: str | os.PathLike[str],
    model: str = DEFAULT_MODEL,
    data: str | None = "python-docs",
    task: str | None = None,
    methods: Sequence[str] = ("zero", "mean", "peak", "resample"),
    top_k: int = 5,
    heads: Sequence[Head] | None = None,
    sweep: str | os.PathLike[str] | None = None,
    rank_method: str = "zero",
    each: bool = False,
    skip_first: bool = False,
    seq_len: int | None = None,
    n_blocks: int = 8,
    n_stats_blocks: int = DEFAULT_N_STATS_BLOCKS,
    stats_data: str | None = None,
    text_field: str = "text",
    seed: int = 0,
    dtype: str = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    device_map: str | dict[str, int | str] | None = None,
    max_memory: dict[int | str, int | str] | None = None,
    offload_folder: str | None = None,
    batch_size: int = 8,
    bins: int = DEFAULT_BINS,
    reservoir: int = 16,
    executor: str | Executor = "serial",
    ray_address: str | None = None,
    workers: int | None = None,
    gpus_per_worker: float = 0.0,
    force: bool = False,
    progress: bool = False,
    on_status: Callable[[str], None] | None = None,
    command: list[str] | None = None,
    prepared: Prepared | None = None,
) -> ShiftResult:
    """Measure how far each method's ablation of ``heads`` (default: the ``top_k`` heads of a
    ``rank_method`` sweep, read from ``sweep`` or computed in the run) pushes the downstream
    activations out of distribution, into a resumable run directory.

    Mirrors ``headlab shift``; see ``headlab shift --help`` for the meaning of every option.
    Returns the tidy table and the figure; prints nothing unless ``progress``.
    """
    methods = list(methods)
    if not methods:
        raise ConfigError("give at least one --method")
    for m in methods:
        intervention_from_name(m)
    check_count("--top-k", top_k)
    check_count("--batch-size", batch_size)
    ex = make_executor(
        executor, ray_address=ray_address, workers=workers, gpus_per_worker=gpus_per_worker
    )
    sweep_here = heads is None and not sweep  # the ranking sweep is computed in this run
    if sweep_here:
        intervention_from_name(rank_method)
    inputs = Inputs(
        model=model, dtype=dtype, device=device, data=None if task else data, task=task,
        text_field=text_field, seq_len=seq_len, n_blocks=n_blocks, n_stats_blocks=n_stats_blocks,
        stats_data=stats_data, seed=seed, trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle, device_map=device_map, max_memory=max_memory,
        offload_folder=offload_folder,
    )  # fmt: skip
    if heads is not None:
        heads = check_heads(heads)  # repeats and non-pairs: refused before loading anything
    if prepared is None:
        prepared = prepare(inputs, on_status=on_status)
    if heads is not None:
        heads = check_heads(heads, prepared.layout)  # beyond the model: before any run directory
    ranking = None
    if heads is None and sweep:
        ranking, _ = load_sweep(sweep, prepared)
    config = stats_config(bins, reservoir, seed, prepared.stats_batch)
    identity = identity_of(
        prepared, methods=methods, top_k=top_k,
        heads=None if heads is None else [list(h) for h in heads],
        sweep=None if sweep is None else str(sweep), rank_method=rank_method, each=each,
        skip_first=skip_first, stats={"bins": bins, "reservoir": reservoir},
    )  # fmt: skip
    with open_run(
        out, "shift", identity, tokens=prepared.eval, command=command, force=force,
        on_status=on_status,
    ) as run, ex:  # fmt: skip
        stats = None
        if needs_stats([*methods, *([rank_method] if sweep_here else [])]):
            stats = job_stats(
                run, prepared, config, batch_size=batch_size, progress=progress,
                on_status=on_status,
            )  # fmt: skip
        if heads is None:
            metric = prepared.metrics[0]
            if ranking is None:
                if on_status:
                    on_status(f"no --sweep or --heads: sweeping every head ({rank_method})")
                ranking = saved_sweep(
                    run, prepared, methods=[rank_method], metrics=[metric], stats=stats,
                    batch_size=batch_size, progress=progress, executor=ex,
                )  # fmt: skip
            heads = _top(ranking, rank_method, metric, top_k)
        for ly, h in heads:
            prepared.layout.check_head(ly, h)
        ctx = prepared.context(stats, batch_size)
        parts = shift_plan(heads, methods, each=each, skip_first=skip_first)

        def said(part: ShiftPart, _table: pd.DataFrame) -> None:
            if on_status:
                on_status(f"measured {part.method} ablation of {len(heads)} heads")

        execute(run, parts, ctx, progress=progress, desc="shift", on_done=said, executor=ex)
        table = load_parts(run, "shift-")
        run.save_table("results.parquet", table)
        figures = {"shift.png": shift_figure(table)}
        for name, fig in figures.items():
            run.save_figure(name, fig)
        run.set_status("complete", heads=[list(h) for h in heads])
        return ShiftResult(table, list(heads), run, figures)


def _top(ranking: pd.DataFrame, method: str, metric: str, k: int) -> list[Head]:
    """The ``k`` heads of a sweep's ``method`` and ``metric`` with the largest effect."""
    where = (ranking["method"] == method) & (ranking["metric"] == metric)
    if not where.any():
        raise ConfigError(
            f"the sweep has no rows for method {method!r} and metric {metric!r}; pick another "
            "--rank-method or give --heads"
        )
    return top_heads(ranking, "effect", k, where=where)
