"""The ``headlab cascade`` job: remove heads one by one with re-ranking, one part per round
(``cascade-step###``, run in order: each round starts from the heads the earlier ones removed),
flag backup heads, and measure the off-target cost of the removed heads (``results.parquet``,
``backups.csv``, ``off_target.csv``, ``cascade.png``)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pandas as pd
from matplotlib.figure import Figure

from headlab.analyses.cascade import (
    CascadePart,
    backup_heads,
    cascade_candidates,
    part_key,
    removed_heads,
)
from headlab.analyses.cascade import off_target as off_target_cost
from headlab.defaults import DEFAULT_BINS, DEFAULT_N_STATS_BLOCKS
from headlab.errors import ConfigError
from headlab.heads import Head, check_heads, random_heads
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
from headlab.jobs.inputs import Inputs, Prepared, off_target_batches, prepare
from headlab.metrics import get_metric
from headlab.models.load import DEFAULT_MODEL
from headlab.plots.cascade import cascade_figure
from headlab.runs import RunDir

__all__ = ["CascadeResult", "finished_rounds", "run_cascade"]


@dataclass
class CascadeResult:
    """What :func:`run_cascade` produced: every round (``table``), the backup heads flagged, the
    heads removed in order, and the off-target cost (``None`` with ``off_target="none"``)."""

    table: pd.DataFrame
    backups: pd.DataFrame
    removed: list[Head]
    off_target: pd.DataFrame | None
    run_dir: RunDir
    figures: dict[str, Figure] = field(default_factory=dict, repr=False)


def run_cascade(
    *,
    out: str | os.PathLike[str],
    model: str = DEFAULT_MODEL,
    data: str | None = "python-docs",
    task: str | None = None,
    method: str = "zero",
    metric: str | None = None,
    steps: int = 4,
    heads: Sequence[Head] | None = None,
    share: float = 0.25,
    ratio: float = 2.0,
    off_target: str = "auto",
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
) -> CascadeResult:
    """Remove ``steps`` heads one by one in importance order, re-ranking after every removal, flag
    backup heads and measure the removed heads' off-target cost, into a resumable run directory.

    Mirrors ``headlab cascade``; see ``headlab cascade --help`` for the meaning of every option.
    ``metric`` defaults to ``ce`` on a corpus and to the task's own metric on a task. Returns the
    tables and the figure; prints nothing unless ``progress``.
    """
    check_count("--steps", steps)
    check_count("--batch-size", batch_size)
    ex = make_executor(
        executor, ray_address=ray_address, workers=workers, gpus_per_worker=gpus_per_worker
    )
    if not (share > 0 and ratio >= 1):
        raise ConfigError("--share must be > 0 and --ratio >= 1")
    iv = intervention_from_name(method)
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
    # fail fast on a target this tokenizer cannot build
    targets = off_target_batches(
        off_target, prepared, n=n_blocks, seq_len=seq_len, seed=seed, exclude_task=task,
        on_status=on_status,
    )  # fmt: skip
    metric = metric or prepared.metrics[0]
    get_metric(metric)
    if heads is not None:
        heads = check_heads(heads, prepared.layout)  # beyond the model: before any run directory
    pool = cascade_candidates(prepared.layout, heads, steps)
    config = stats_config(bins, reservoir, seed, prepared.stats_batch)
    identity = identity_of(
        prepared, method=method, metric=metric, steps=steps,
        heads=None if heads is None else [list(h) for h in heads],
        stats={"bins": bins, "reservoir": reservoir},
    )  # fmt: skip
    with open_run(
        out, "cascade", identity, tokens=prepared.eval, command=command, force=force,
        on_status=on_status,
    ) as run, ex:  # fmt: skip
        stats = None
        if needs_stats([method]):
            stats = job_stats(
                run, prepared, config, batch_size=batch_size, progress=progress,
                on_status=on_status,
            )  # fmt: skip
        ctx = prepared.context(stats, batch_size)
        gone = finished_rounds(run)

        def picked(part: CascadePart, table: pd.DataFrame) -> None:
            gone.append(removed_heads(table)[0])
            if on_status:
                ly, h = gone[-1]
                on_status(f"round {part.step}: removed L{ly}.H{h}")

        for step in range(len(gone), steps):  # each round needs the heads removed before it
            part = CascadePart(step, method, iv, metric, pool, tuple(gone))
            execute(
                run, [part], ctx, progress=progress, desc=f"round {step}", on_done=picked,
                executor=ex,
            )  # fmt: skip
        table = load_parts(run, "cascade-").sort_values(["step", "layer", "head"])
        table = table.reset_index(drop=True)
        backups = backup_heads(table, share=share, ratio=ratio)
        gone = removed_heads(table)
        run.save_table("results.parquet", table)
        run.save_table("backups.csv", backups)
        figures = {"cascade.png": cascade_figure(table, backups, gone)}
        for name, fig in figures.items():
            run.save_figure(name, fig)
        cost = None
        if targets:
            selected_on = task or data
            selections = {
                selected_on: gone,
                "random": random_heads(
                    prepared.layout, len(gone), seed=seed, exclude=gone, pool=heads
                ),
            }
            own = selected_on if selected_on not in targets else f"{selected_on} (eval blocks)"
            cost = off_target_cost(
                prepared.model, selections, {own: (prepared.eval, metric), **targets},
                method=method, stats=stats, batch_size=batch_size, layout=prepared.layout,
            )  # fmt: skip
            run.save_table("off_target.csv", cost)
        run.set_status(
            "complete",
            removed=[list(h) for h in gone],
            backups=[[int(r.layer), int(r.head), int(r.trigger_layer), int(r.trigger_head)]
                     for r in backups.itertuples()],
        )  # fmt: skip
        return CascadeResult(table, backups, gone, cost, run, figures)


def finished_rounds(run: RunDir) -> list[Head]:
    """The heads removed by the rounds already saved in ``run``, in order. Each round builds on
    the ones before it, so the rounds after a missing one (a damaged part dropped on resume) are
    dropped too, and redone."""
    keys = sorted(k for k in run.done_parts() if k.startswith("cascade-step"))
    n = next((i for i, k in enumerate(keys) if k != part_key(i)), len(keys))
    for key in keys[n:]:
        run.drop_part(key, "follows a round that is recomputed")
    if n == 0:
        return []
    return removed_heads(pd.concat([run.read_part(k) for k in keys[:n]], ignore_index=True))
