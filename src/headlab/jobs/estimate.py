"""The ``headlab estimate`` job: cheap importance estimates for every head
(``estimates.parquet``, ``ranking.csv``, heatmaps) and the same estimates per example
(``per_example.parquet``), optionally checked by exact ablation of the top heads plus a random
sample (``exact.parquet``, ``correlation.csv``). ``atp:patch`` patches in the
``--counterfactual`` pairs (``counterfactual.safetensors``)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pandas as pd
from matplotlib.figure import Figure

from headlab.analyses.estimate import check_methods, estimate_tables, estimate_then_exact
from headlab.analyses.sweep import COUNTERFACTUAL, PATCH, rank_heads, sweep_plan, tidy
from headlab.batch import Batch
from headlab.defaults import DEFAULT_BINS, DEFAULT_N_STATS_BLOCKS
from headlab.errors import ConfigError
from headlab.heads import Head
from headlab.interventions import Intervention, Patch
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
from headlab.jobs.inputs import (
    Inputs,
    Prepared,
    counterfactual_source,
    needs_counterfactual,
    prepare,
    save_counterfactual,
    statistics_counterfactual,
)
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
    figures and where they were written; ``per_example``: the estimates per example
    (:func:`headlab.analyses.estimate.per_example_estimates`)."""

    table: pd.DataFrame
    exact: pd.DataFrame | None
    correlation: pd.DataFrame | None
    run_dir: RunDir
    figures: dict[str, Figure] = field(default_factory=dict, repr=False)
    per_example: pd.DataFrame | None = None


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
    force: bool = False,
    progress: bool = False,
    on_status: Callable[[str], None] | None = None,
    command: list[str] | None = None,
    prepared: Prepared | None = None,
    executor: str | Executor = "serial",
    ray_address: str | None = None,
    workers: int | None = None,
    gpus_per_worker: float = 0.0,
    counterfactual: str | os.PathLike[str] | None = None,
) -> EstimateResult:
    """Estimate every head's importance at once, optionally check the estimates by exact
    ablation (``exact_top`` > 0), and write a run directory.

    Mirrors ``headlab estimate``; see ``headlab estimate --help`` for the meaning of every option.
    Returns the tables and the figures; prints nothing unless ``progress``. The exact check
    runs as sweep parts (``exact-METHOD-METRIC-*``: resumable, and on Ray with ``executor``).
    ``counterfactual`` (``--counterfactual``): what ``atp:patch`` patches in — a JSONL file of
    clean/corrupted pairs, or ``"builtin"`` (the default for ``--task names``/``capitals``);
    without one, a corpus or ``induction`` run patches in the statistics split.
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
        counterfactual=counterfactual_source(counterfactual, task, methods),
    )  # fmt: skip
    if prepared is None:
        prepared = prepare(inputs, on_status=on_status)
    metric_names = list(metrics) if metrics else prepared.metrics
    for m in metric_names:
        get_metric(m)
    batch = prepared.eval
    cf = _counterfactual(prepared, methods, on_status)
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
        save_counterfactual(run, cf)
        stats = None
        if needs_stats(methods):
            stats = job_stats(
                run, prepared, config, batch_size=batch_size, progress=progress,
                on_status=on_status,
            )  # fmt: skip
        if on_status:
            on_status(f"estimating {', '.join(methods)} for every head")
        tables = estimate_tables(
            prepared.model, batch, methods=methods, metrics=metric_names, stats=stats,
            counterfactual=cf, batch_size=batch_size, layout=prepared.layout,
            rollout_sources=rollout_sources,
        )  # fmt: skip
        table = tables.table
        exact = correlation = None
        if exact_top > 0:
            ctx = prepared.context(stats, batch_size, {} if cf is None else {COUNTERFACTUAL: cf})

            def exact_sweep(iv: Intervention, metric: Metric, heads: list[Head]) -> pd.DataFrame:
                prefix = f"exact-{metric.name}-"
                # exact patching records the counterfactual in each part (sent by name)
                method = PATCH if isinstance(iv, Patch) else iv
                parts = sweep_plan(
                    prepared.layout, methods=[method], metrics=[metric], heads=heads,
                    prefix=prefix,
                )  # fmt: skip
                execute(run, parts, ctx, progress=progress, desc="exact check", executor=ex)
                done = load_parts(run, prefix)
                return done[done["method"] == iv.label].reset_index(drop=True)

            exact, correlation = _check(
                prepared, table, methods, metric_names, exact_top=exact_top, n_random=n_random,
                stats=stats, counterfactual=cf, batch_size=batch_size,
                on_status=on_status, exact_sweep=exact_sweep,
            )  # fmt: skip
            run.save_table("exact.parquet", exact)
            run.save_table("correlation.csv", correlation)
        run.save_table("estimates.parquet", table)
        run.save_table("per_example.parquet", tables.per_example)
        run.save_table("ranking.csv", rank_heads(table))
        figures = estimate_figures(table)
        for name, fig in figures.items():
            run.save_figure(name, fig)
        run.set_status("complete")
        return EstimateResult(table, exact, correlation, run, figures, tables.per_example)


def _counterfactual(
    prepared: Prepared, methods: Sequence[str], on_status: Callable[[str], None] | None
) -> Batch | None:
    """The inputs ``atp:patch`` patches in: the ``--counterfactual`` pairs, else (a corpus or
    ``induction``) the first examples of the statistics split; ``None`` without ``atp:patch``
    and without pairs."""
    if prepared.counterfactual is not None:
        return prepared.counterfactual
    if not needs_counterfactual(methods):
        return None
    if on_status:
        on_status("atp:patch: no --counterfactual pairs; patching in the statistics split")
    return statistics_counterfactual(prepared)


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
