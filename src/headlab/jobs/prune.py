"""The ``headlab prune`` job: pruning curves, one part per (order, method, seed), into a resumable
run directory (parts ``prune-ORDER-METHOD-sSEED``, a ``sweep-*`` sweep when an importance order
has no ``--sweep``; ``results.parquet``, ``summary.csv``, ``removable.csv``, ``prune.png``)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from headlab.analyses.prune import (
    DEFAULT_FRACTIONS,
    PrunePart,
    check_fractions,
    check_orders,
    prune_parts,
    removable_fraction,
    summarize,
)
from headlab.defaults import DEFAULT_BINS, DEFAULT_N_STATS_BLOCKS
from headlab.errors import ConfigError
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
from headlab.metrics import get_metric
from headlab.models.load import DEFAULT_MODEL
from headlab.plots.prune import prune_figure
from headlab.runs import RunDir

__all__ = ["PruneResult", "run_prune"]


@dataclass
class PruneResult:
    """What :func:`run_prune` produced: the curves (``table``), their mean over seeds
    (``summary``), the largest fraction within ``tolerance`` per order and method
    (``removable``, in units of ``metric``), and whether the ranking sweep was measured on the
    run's own blocks (``same_blocks``; ``None`` without an importance order)."""

    table: pd.DataFrame
    summary: pd.DataFrame
    removable: pd.DataFrame
    run_dir: RunDir
    tolerance: float
    metric: str
    same_blocks: bool | None = None
    figures: dict[str, Figure] = field(default_factory=dict, repr=False)

    def check_removable(self) -> None:
        """Raise :class:`~headlab.errors.ConfigError` when no fraction above 0 stays within the
        tolerance for any curve (``headlab prune`` exits with status 2 then)."""
        removable_fraction(self.table, self.tolerance, metric=self.metric, strict=True)


def run_prune(
    *,
    out: str | os.PathLike[str],
    model: str = DEFAULT_MODEL,
    data: str | None = "python-docs",
    task: str | None = None,
    unit: str = "head",
    methods: Sequence[str] = ("zero", "mean", "peak", "resample"),
    orders: Sequence[str] = ("random", "sweep"),
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seeds: Sequence[int] = (0, 1, 2),
    metrics: Sequence[str] | None = None,
    rank_metric: str | None = None,
    tolerance: float = 0.1,
    sweep: str | os.PathLike[str] | None = None,
    seq_len: int | None = None,
    n_blocks: int = 4,
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
) -> PruneResult:
    """Pruning curves of growing fractions of heads (or attention neurons) under each method, in
    random, sweep or re-ranked order, into a resumable run directory.

    Mirrors ``headlab prune``; see ``headlab prune --help`` for the meaning of every option.
    ``metrics`` defaults to ``ce, top1`` on a text corpus and to the data's own metrics otherwise
    (a task's metric; ``embed_cos`` on a bare encoder; ``cls_ce, cls_acc`` on images);
    without ``sweep``, the sweep order ranks every method by a sweep of the first method computed
    in the run. Returns the tables and the figure; prints nothing unless ``progress``.
    """
    methods, orders, seeds = list(methods), list(orders), list(seeds)
    fractions = check_fractions(fractions)
    if not methods:
        raise ConfigError("give at least one --method")
    for m in methods:
        intervention_from_name(m)
    check_orders(orders, unit)
    if not (tolerance >= 0):
        raise ConfigError(f"--tolerance must be >= 0 (metric units), got {tolerance}")
    if sweep and not (Path(sweep) / "manifest.json").is_file():
        raise ConfigError(f"--sweep {sweep} is not a finished headlab sweep run directory")
    check_count("--batch-size", batch_size)
    ex = make_executor(
        executor, ray_address=ray_address, workers=workers, gpus_per_worker=gpus_per_worker
    )
    inputs = Inputs(
        model=model, dtype=dtype, device=device, data=None if task else data, task=task,
        text_field=text_field, seq_len=seq_len, n_blocks=n_blocks, n_stats_blocks=n_stats_blocks,
        stats_data=stats_data, seed=seed, trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle, device_map=device_map, max_memory=max_memory,
        offload_folder=offload_folder,
    )  # fmt: skip
    if prepared is None:
        prepared = prepare(inputs, on_status=on_status)
    # a text corpus: ce and top1; else the data's own (a task's, embed_cos, cls_ce and cls_acc)
    corpus = task is None and prepared.metrics == ["ce"]
    default_metrics = ["ce", "top1"] if corpus else prepared.metrics
    metrics = list(metrics) if metrics else default_metrics
    for m in [*metrics, *([rank_metric] if rank_metric else [])]:
        get_metric(m)
    rank = rank_metric or metrics[0]
    importance, same_blocks = None, None
    if sweep and "sweep" in orders:
        importance, same_blocks = load_sweep(sweep, prepared)
    config = stats_config(bins, reservoir, seed, prepared.stats_batch)
    identity = identity_of(
        prepared, unit=unit, methods=methods, orders=orders, fractions=fractions, seeds=seeds,
        metrics=metrics, rank_metric=rank_metric, sweep=None if sweep is None else str(sweep),
        stats={"bins": bins, "reservoir": reservoir},
    )  # fmt: skip
    with open_run(
        out, "prune", identity, tokens=prepared.eval, command=command, force=force,
        on_status=on_status,
    ) as run, ex:  # fmt: skip
        stats = None
        if needs_stats(methods):
            stats = job_stats(
                run, prepared, config, batch_size=batch_size, progress=progress,
                on_status=on_status,
            )  # fmt: skip
        if "sweep" in orders and importance is None:
            if on_status:
                on_status(
                    f"no --sweep given: sweeping every head with {methods[0]} (saved in the run "
                    "directory); every method's sweep order uses that ranking"
                )
            same_blocks = True
            importance = saved_sweep(
                run, prepared, methods=methods[:1], metrics=[rank], stats=stats,
                batch_size=batch_size, progress=progress, executor=ex,
            )  # fmt: skip
        parts = prune_parts(
            prepared.layout, methods=methods, orders=orders, unit=unit, fractions=fractions,
            seeds=seeds, metrics=metrics, importance=importance, rank_metric=rank_metric,
        )  # fmt: skip
        ctx = prepared.context(stats, batch_size)

        def said(part: PrunePart, _table: pd.DataFrame) -> None:
            if on_status:
                on_status(f"curve done: {part.order} / {part.method} / seed {part.seed}")

        execute(run, parts, ctx, progress=progress, desc="prune", on_done=said, executor=ex)
        return _finish(run, tolerance, metrics[0], same_blocks)


def _finish(run: RunDir, tolerance: float, metric: str, same_blocks: bool | None) -> PruneResult:
    table = load_parts(run, "prune-")
    table = table.sort_values(["order", "method", "seed", "metric", "fraction"], kind="stable")
    table = table.reset_index(drop=True)
    summary = summarize(table)
    removable = removable_fraction(table, tolerance, metric=metric)
    run.save_table("results.parquet", table)
    run.save_table("summary.csv", summary)
    run.save_table("removable.csv", removable)
    figures = {"prune.png": prune_figure(summary)}
    for name, fig in figures.items():
        run.save_figure(name, fig)
    run.set_status(
        "complete",
        removable={
            f"{r.order}/{r.method}": None if pd.isna(r.fraction) else r.fraction
            for r in removable.itertuples()
        },
        sweep_on_same_blocks=same_blocks,
    )
    return PruneResult(
        table, summary, removable, run, tolerance, metric, same_blocks, figures
    )  # fmt: skip
