"""The ``headlab estimate`` job: cheap importance estimates for every head
(``estimates.parquet``, ``ranking.csv``, heatmaps), optionally checked by exact ablation of the
top heads plus a random sample (``exact.parquet``, ``correlation.csv``)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pandas as pd
from matplotlib.figure import Figure

from headlab.analyses.estimate import check_methods, estimate, estimate_then_exact
from headlab.analyses.sweep import rank_heads, sweep_plan, tidy
from headlab.batch import Batch
from headlab.errors import ConfigError
from headlab.heads import Head
from headlab.interventions import Intervention
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
from headlab.metrics import Metric, get_metric
from headlab.models.load import DEFAULT_MODEL
from headlab.plots.estimate import estimate_figures
from headlab.runs import RunDir
from headlab.stats import Stats

__all__ = ["EstimateResult", "run_estimate"]

#: donor inputs kept for atp:resample (not an option of the command)
RESERVOIR = 16


@dataclass
class EstimateResult:
    """What :func:`run_estimate` produced: the estimates, the exact check (if asked), the
    figures and where they were written."""

    table: pd.DataFrame
    exact: pd.DataFrame | None
    correlation: pd.DataFrame | None
    run_dir: RunDir
    figures: dict[str, Figure] = field(default_factory=dict, repr=False)


def run_estimate(
    *,
    out: str | os.PathLike[str],
    model: str = DEFAULT_MODEL,
    data: str | None = "python-docs",
    task: str | None = None,
    methods: Sequence[str] = ("atp:zero", "gradient", "rollout"),
    metrics: Sequence[str] | None = None,
    exact_top: int = 0,
    n_random: int = 10,
    rollout_sources: str = "context",
    seq_len: int | None = None,
    n_blocks: int = 8,
    n_stats_blocks: int = 16,
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
    bins: int = 1000,
    force: bool = False,
    progress: bool = False,
    on_status: Callable[[str], None] | None = None,
    command: list[str] | None = None,
    prepared: Prepared | None = None,
    executor: str | Executor = "serial",
    ray_address: str | None = None,
    workers: int | None = None,
    gpus_per_worker: float = 0.0,
) -> EstimateResult:
    """Estimate every head's importance at once, optionally check the estimates by exact
    ablation (``exact_top`` > 0), and write a run directory.

    Mirrors ``headlab estimate``; see ``headlab estimate --help`` for the meaning of every option.
    Returns the tables and the figures; prints nothing unless ``progress``. The exact check
    runs as sweep parts (``exact-METHOD-METRIC-*``: resumable, and on Ray with ``executor``).
    """
    methods = list(methods)
    if not methods:
        raise ConfigError("give at least one --method")
    check_methods(methods)  # unknown names: refused before loading anything
    check_count("--exact-top", exact_top, low=0)
    check_count("--n-random", n_random, low=0)
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
    metric_names = list(metrics) if metrics else prepared.metrics
    for m in metric_names:
        get_metric(m)
    batch = prepared.eval
    counterfactual = _counterfactual(prepared) if "atp:patch" in methods else None
    # the statistics are drawn with seed 0 whatever --seed is (as they always were)
    config = stats_config(bins, RESERVOIR, 0, prepared.stats_batch)
    identity = identity_of(
        prepared, methods=methods, metrics=metric_names, exact_top=exact_top, n_random=n_random,
        rollout_sources=rollout_sources, stats_config=config,
    )  # fmt: skip
    with open_run(
        out, "estimate", identity, tokens=batch, command=command, force=force,
        on_status=on_status,
    ) as run, ex:  # fmt: skip
        stats = None
        if needs_stats(methods):
            stats = job_stats(
                run, prepared, config, batch_size=batch_size, progress=progress,
                on_status=on_status,
            )  # fmt: skip
        if on_status:
            on_status(f"estimating {', '.join(methods)} for every head")
        table = estimate(
            prepared.model, batch, methods=methods, metrics=metric_names, stats=stats,
            counterfactual=counterfactual, batch_size=batch_size, layout=prepared.layout,
            rollout_sources=rollout_sources,
        )  # fmt: skip
        exact = correlation = None
        if exact_top > 0:
            ctx = prepared.context(stats, batch_size)

            def exact_sweep(iv: Intervention, metric: Metric, heads: list[Head]) -> pd.DataFrame:
                prefix = f"exact-{metric.name}-"
                parts = sweep_plan(
                    prepared.layout, methods=[iv], metrics=[metric], heads=heads, prefix=prefix
                )
                execute(run, parts, ctx, progress=progress, desc="exact check", executor=ex)
                done = load_parts(run, prefix)
                return done[done["method"] == iv.label].reset_index(drop=True)

            exact, correlation = _check(
                prepared, table, methods, metric_names, exact_top=exact_top, n_random=n_random,
                stats=stats, counterfactual=counterfactual, batch_size=batch_size,
                on_status=on_status, exact_sweep=exact_sweep,
            )  # fmt: skip
            run.save_table("exact.parquet", exact)
            run.save_table("correlation.csv", correlation)
        run.save_table("estimates.parquet", table)
        run.save_table("ranking.csv", rank_heads(table))
        figures = estimate_figures(table)
        for name, fig in figures.items():
            run.save_figure(name, fig)
        run.set_status("complete")
        return EstimateResult(table, exact, correlation, run, figures)


def _counterfactual(prepared: Prepared) -> Batch:
    """The inputs ``atp:patch`` patches in: the first examples of the statistics split."""
    batch, donors = prepared.eval, prepared.stats_batch
    if len(donors) < len(batch) or donors.seq_len != batch.seq_len:
        raise ConfigError(
            "atp:patch patches in the statistics split, which needs at least --n-blocks "
            f"inputs of the same length ({len(donors)} x {donors.seq_len} for {len(batch)} x "
            f"{batch.seq_len})"
        )
    return donors.slice(0, len(batch))


def _check(
    prepared: Prepared,
    table: pd.DataFrame,
    methods: Sequence[str],
    metrics: Sequence[str],
    *,
    exact_top: int,
    n_random: int,
    stats: Stats | None,
    counterfactual: Batch | None,
    batch_size: int,
    on_status: Callable[[str], None] | None,
    exact_sweep: Callable[..., pd.DataFrame] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Exact ablation of each method's top ``exact_top`` heads plus ``n_random`` others: the
    exact table and the estimate-vs-exact correlations."""
    checks = []
    for method in methods:
        for metric in metrics if method != "rollout" else metrics[:1]:
            if on_status:
                on_status(f"{method}: exact ablation of {exact_top} + {n_random} heads")
            check = estimate_then_exact(
                prepared.model, prepared.eval, method=method, metric=metric, exact_top=exact_top,
                n_random=n_random, seed=prepared.inputs.seed, layout=prepared.layout,
                estimates=table, stats=stats, counterfactual=counterfactual, batch_size=batch_size,
                exact_sweep=exact_sweep,
            )  # fmt: skip
            checks.append(check)
    exact = pd.concat([c.exact for c in checks], ignore_index=True)
    exact = tidy(exact.drop_duplicates(["layer", "head", "method", "metric"]))
    correlation = pd.concat([c.correlation for c in checks], ignore_index=True)
    return exact, correlation
