"""The ``headlab sweep`` job: ablate every head alone under each method, part by part, into a
resumable run directory (parts ``METHOD-L###``, ``results.parquet``, ``ranking.csv``, heatmaps).

With ``top_k`` (``--top-k K``) it runs the top-k search instead (:mod:`headlab.analyses.topk`): a
``sweep-topk`` run directory in the same format, with parts ``topk-*`` saved round by round, the
intervals and statuses in ``results.parquet`` and the search's cost in the manifest."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from headlab.analyses.sweep import check_method, rank_heads, sweep_plan, tidy
from headlab.analyses.topk import RaceRule, search
from headlab.analyses.topk import ranking as topk_ranking
from headlab.defaults import DEFAULT_BINS, DEFAULT_N_STATS_BLOCKS
from headlab.errors import ConfigError
from headlab.heads import Head, check_heads
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
    prepare,
    require_counterfactual,
    save_counterfactual,
)
from headlab.metrics import get_metric
from headlab.models.load import DEFAULT_MODEL
from headlab.parts import Context
from headlab.plots.sweep import sweep_figures
from headlab.runs import RunDir, read_manifest
from headlab.stats import Stats

__all__ = ["SweepResult", "load_sweep", "run_sweep", "saved_sweep"]


@dataclass
class SweepResult:
    """What :func:`run_sweep` produced."""

    table: pd.DataFrame
    ranking: pd.DataFrame
    run_dir: RunDir
    figures: dict[str, Figure] = field(default_factory=dict, repr=False)
    #: ``--top-k`` runs: the rule, the per-(method/metric) summary and the cost (else ``None``)
    search: dict[str, Any] | None = None

    def top(self, k: int = 5) -> pd.DataFrame:
        """The ``k`` most important heads per method and metric."""
        return self.ranking[self.ranking["rank"] <= k]


def run_sweep(
    *,
    out: str | os.PathLike[str],
    model: str = DEFAULT_MODEL,
    data: str | None = "python-docs",
    task: str | None = None,
    methods: Sequence[str] = ("zero", "mean", "peak"),
    metrics: Sequence[str] | None = None,
    heads: Sequence[Head] | None = None,
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
    counterfactual: str | os.PathLike[str] | None = None,
    top_k: int | None = None,
    confidence: float = 0.95,
    direction: str = "abs",
    max_cost: float | None = None,
    range_factor: float = 1.0,
) -> SweepResult:
    """Ablate every head alone under each method and write a resumable run directory.

    Mirrors ``headlab sweep``; see ``headlab sweep --help`` for the meaning of every option.
    ``top_k`` (``--top-k``) searches for the ``top_k`` heads of largest exact effect instead of
    sweeping all (with ``confidence``, ``direction``, ``max_cost``, ``range_factor``; see
    :func:`headlab.analyses.topk.top_k`); the result's ``search`` then holds what it decided.
    ``counterfactual`` is ``--counterfactual``: a JSONL file of clean/corrupted pairs, or
    ``"builtin"`` (the default for ``--task names``/``capitals`` with method ``patch``).
    Returns the tidy table, the ranking and the figures; prints nothing unless ``progress``.
    """
    methods = list(methods)
    if not methods:
        raise ConfigError("give at least one --method")
    for m in methods:
        check_method(m)
    check_count("--batch-size", batch_size)
    rule = None
    if top_k is not None:
        rule = RaceRule(
            k=top_k, confidence=confidence, direction=direction, max_cost=max_cost,
            range_factor=range_factor, seed=seed,
        ).check()  # fmt: skip
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
    if heads is not None:
        heads = check_heads(heads)  # repeats and non-pairs: refused before loading anything
    if prepared is None:
        require_counterfactual(inputs.counterfactual, methods)
        prepared = prepare(inputs, on_status=on_status)
    require_counterfactual(prepared.counterfactual, methods)
    if heads is not None:
        heads = check_heads(heads, prepared.layout)  # beyond the model: before any run directory
    metric_names = list(metrics) if metrics else prepared.metrics
    for m in metric_names:
        get_metric(m)
    config = stats_config(bins, reservoir, seed, prepared.stats_batch)
    identity = identity_of(
        prepared, methods=methods, metrics=metric_names,
        heads=None if heads is None else [list(h) for h in heads], stats_config=config,
    )  # fmt: skip
    kind = "sweep"
    if rule is not None:  # a search is its own kind of run: resuming never mixes it with a sweep
        lay = prepared.layout
        n_heads = len(heads) if heads is not None else lay.n_layers * lay.n_heads
        rule = rule.check(n_heads, len(prepared.eval))
        identity["top_k"] = asdict(rule)
        kind = "sweep-topk"
    with open_run(
        out, kind, identity, tokens=prepared.eval, command=command, force=force,
        on_status=on_status,
    ) as run, ex:  # fmt: skip
        save_counterfactual(run, prepared.counterfactual)
        stats = None
        if needs_stats(methods):
            stats = job_stats(
                run, prepared, config, batch_size=batch_size, progress=progress,
                on_status=on_status,
            )  # fmt: skip
        ctx = prepared.context(stats, batch_size)
        if rule is not None:
            return _top_k(run, ctx, rule, methods, metric_names, heads, progress, ex)
        parts = sweep_plan(prepared.layout, methods=methods, metrics=metric_names, heads=heads)
        execute(run, parts, ctx, progress=progress, desc="sweep", executor=ex)
        return _finish(
            run, load_parts(run), len(parts[0].metrics) * sum(len(p.heads) for p in parts)
        )


def _finish(run: RunDir, table: pd.DataFrame, expected: int) -> SweepResult:
    table = tidy(table)
    if len(table) != expected:
        raise ConfigError(f"run directory {run.path} holds {len(table)} rows, expected {expected}")
    ranking = rank_heads(table)
    run.save_table("results.parquet", table)
    run.save_table("ranking.csv", ranking)
    figures = sweep_figures(table)
    for name, fig in figures.items():
        run.save_figure(name, fig)
    metrics = sorted(set(table["metric"]))
    run.set_status(
        "complete",
        baseline={m: float(table[table.metric == m]["baseline"].iloc[0]) for m in metrics},
        top_heads={
            f"{meth}/{met}": [
                [int(r.layer), int(r.head), float(r.delta)] for r in g.head(5).itertuples()
            ]
            for (meth, met), g in ranking.groupby(["method", "metric"], sort=True)
        },
    )
    return SweepResult(table, ranking, run, figures)


def _top_k(
    run: RunDir,
    ctx: Context,
    rule: RaceRule,
    methods: Sequence[str],
    metrics: Sequence[str],
    heads: Sequence[Head] | None,
    progress: bool,
    executor: Executor,
) -> SweepResult:
    """The top-k search inside ``run``: each round's parts run (the missing ones) through
    ``executor`` and are read back from the run directory, so a resumed run replays the same
    rounds; then the tables, figures and manifest."""
    rounds = [0]

    def run_parts(parts: list) -> list[pd.DataFrame]:
        desc = "top-k clean" if rounds[0] == 0 else f"top-k round {rounds[0] - 1}"
        rounds[0] += 1
        execute(run, parts, ctx, progress=progress, desc=desc, executor=executor)
        return [run.read_part(p.key) for p in parts]

    found = search(
        ctx.layout, len(ctx.batch), max(ctx.batch.seq_len, 1), methods=methods, metrics=metrics,
        rule=rule, run_parts=run_parts, heads=heads,
    )  # fmt: skip
    table, ranking = found.table, topk_ranking(found.table)
    run.save_table("results.parquet", table)
    run.save_table("ranking.csv", ranking)
    figures = sweep_figures(table)
    for name, fig in figures.items():
        run.save_figure(name, fig)
    info = {"rule": asdict(rule), "summary": found.summary, "cost": found.cost}
    run.set_status(
        "complete",
        baseline={m: float(table[table.metric == m]["baseline"].iloc[0]) for m in metrics},
        top_heads={key: s["top"] for key, s in found.summary.items()},
        top_k=info,
    )
    return SweepResult(table, ranking, run, figures, info)


def load_sweep(path: str | Path, prepared: Prepared) -> tuple[pd.DataFrame, bool]:
    """The table of a finished ``headlab sweep`` run directory and whether it was measured on
    exactly this command's evaluation blocks (``False``: other blocks of the same data, i.e. a
    held-out ranking). Refused unless it was run on this model and the same data (corpus or task,
    text field and block length)."""
    folder = Path(path)
    if not (folder / "manifest.json").is_file() or not (folder / "results.parquet").is_file():
        raise ConfigError(
            f"--sweep {folder} is not a finished headlab sweep run directory (no manifest.json "
            "and results.parquet); run `headlab sweep --out DIR` first or omit --sweep"
        )
    manifest = read_manifest(folder)
    if manifest.get("kind") != "sweep":
        raise ConfigError(f"--sweep {folder} holds a {manifest.get('kind')!r} run, not a sweep")
    theirs, mine = manifest.get("identity", {}), prepared.identity()
    if theirs.get("model_fingerprint") != mine["model_fingerprint"]:
        raise ConfigError(
            f"--sweep {folder} was run on a different model than this command; sweep this "
            "--model (or omit --sweep to compute a sweep here)"
        )
    for key in ("data", "task", "text_field", "seq_len"):
        if theirs.get(key) != mine.get(key):
            raise ConfigError(
                f"--sweep {folder} was run on different data ({key}: {theirs.get(key)!r}, here "
                f"{mine.get(key)!r}); sweep the same --data/--task and --seq-len, or omit --sweep"
            )
    same = theirs.get("eval_fingerprint") == mine["eval_fingerprint"]
    try:
        return pd.read_parquet(folder / "results.parquet"), same
    except Exception as err:
        raise ConfigError(
            f"{folder / 'results.parquet'} is damaged ({err}); re-run that sweep to rewrite it "
            "(delete the file, then the same `headlab sweep` command), or omit --sweep"
        ) from None


def saved_sweep(
    run: RunDir,
    prepared: Prepared,
    *,
    methods: Sequence[str],
    metrics: Sequence[str],
    stats: Stats | None,
    batch_size: int,
    progress: bool = False,
    executor: Executor | None = None,
) -> pd.DataFrame:
    """A single-head sweep computed inside another job's ``run`` (parts ``sweep-*``,
    resumable, run by ``executor``), as a tidy table."""
    ctx = prepared.context(stats, batch_size)
    parts = sweep_plan(prepared.layout, methods=methods, metrics=metrics, prefix="sweep-")
    execute(run, parts, ctx, progress=progress, desc="sweep", executor=executor)
    return tidy(load_parts(run, "sweep-"))
