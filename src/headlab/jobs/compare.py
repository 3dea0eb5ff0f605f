"""The ``headlab compare`` job: measure every head's importance per example with each measure
(parts ``atp_METHOD``, ``gradient``, ``rollout``, ``attention``, ``ablation_METHOD-L###``), then
``per_example.parquet``, ``scores.parquet``, ``agreement.csv``, ``pairs.csv``, ``compare.png``,
``recall_cost.png`` and, with ``off_target``, ``off_target.csv``."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from headlab.analyses.compare import PER_EXAMPLE_COLUMNS, compare_plan, part_key, summarise
from headlab.analyses.compare import measures as measure_names
from headlab.batch import Batch
from headlab.defaults import DEFAULT_BINS, DEFAULT_N_STATS_BLOCKS
from headlab.errors import ConfigError
from headlab.heads import random_heads, top_heads
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
    off_target_batches,
    prepare,
    require_counterfactual,
    require_one_length,
    save_counterfactual,
)
from headlab.jobs.sweep import load_sweep
from headlab.models.load import DEFAULT_MODEL
from headlab.parts import Part
from headlab.plots.compare import compare_figure, recall_cost_figure
from headlab.runs import RunDir, read_manifest
from headlab.stats import Stats

__all__ = ["CompareResult", "run_compare"]


@dataclass
class CompareResult:
    """What :func:`run_compare` produced.

    Attributes:
        per_example: every measure per example (``measure, metric, example, layer, head, value,
            weight``).
        scores: whole-batch scores (``layer, head, measure, metric, value, rank``).
        agreement: each measure against ``reference`` (Spearman, bootstrap CI, top-k overlap).
        pairs: Spearman and top-k overlap between every pair of measures.
        off_target: the cost of ablating each measure's top-k heads on other targets (``None``
            without ``off_target``).
    """

    per_example: pd.DataFrame
    scores: pd.DataFrame
    agreement: pd.DataFrame
    pairs: pd.DataFrame
    off_target: pd.DataFrame | None
    reference: str
    run_dir: RunDir
    figures: dict[str, Figure] = field(default_factory=dict, repr=False)


def run_compare(
    *,
    out: str | os.PathLike[str],
    model: str = DEFAULT_MODEL,
    data: str | None = "python-docs",
    task: str | None = None,
    methods: Sequence[str] = ("zero", "mean"),
    measures: Sequence[str] = ("atp", "gradient", "rollout", "attention"),
    metric: str | None = None,
    reference: str | None = None,
    bootstrap: int = 1000,
    ci: float = 0.95,
    top_k: int = 10,
    sweep: str | os.PathLike[str] | None = None,
    rollout_sources: str = "context",
    attention_keys: str = "auto",
    off_target: str = "none",
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
    counterfactual: str | os.PathLike[str] | None = None,
) -> CompareResult:
    """Measure every head with exact ablation (each of ``methods``) and the cheap ``measures``
    on the same examples, compare the rankings, and write a resumable run directory.

    Mirrors ``headlab compare``; see ``headlab compare --help`` for the meaning of every option.
    ``counterfactual`` (``--counterfactual``: a JSONL file of clean/corrupted pairs, or
    ``"builtin"``, the default for ``--task names``/``capitals``) is what method ``patch``
    (measure ``ablation:patch``) and ``atp:patch`` patch in, on the same examples.
    Returns the comparison tables and the figure; prints nothing unless ``progress``.
    """
    methods = list(methods)
    names = measure_names(methods, list(measures))
    reference = reference or names[0]
    if reference not in names:
        raise ConfigError(
            f"--reference {reference} is not one of the measures compared ({', '.join(names)})"
        )
    if off_target.strip() != "none" and _off_target_method(reference, methods) == "patch":
        raise ConfigError(
            "--off-target ablates each measure's top-k heads on other targets with the "
            "reference's method, and patch has no counterfactual there; put another method "
            "first in --methods (e.g. zero,patch) or give --reference ablation:zero"
        )
    check_count("--bootstrap", bootstrap, low=0)
    if not 0 < ci < 1:
        raise ConfigError(f"--ci must be between 0 and 1 (e.g. 0.95), got {ci}")
    check_count("--top-k", top_k)
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
        counterfactual=counterfactual_source(counterfactual, task, names),
    )  # fmt: skip
    if prepared is None:
        require_counterfactual(inputs.counterfactual, names)
        prepared = prepare(inputs, on_status=on_status)
    require_counterfactual(prepared.counterfactual, names)
    if "attention" in names:
        require_one_length(prepared, "the attention measure")
    n_heads = prepared.layout.n_layers * prepared.layout.n_heads
    k = min(top_k, n_heads)
    if k < top_k and on_status:
        on_status(f"--top-k {top_k} is more than the model's {n_heads} heads; using {n_heads}")
    targets = off_target_batches(  # fail fast on a target the tokenizer cannot build
        off_target, prepared, n=n_blocks, seq_len=seq_len, seed=seed, exclude_task=task,
        on_status=on_status,
    )  # fmt: skip
    metric = metric or prepared.metrics[0]
    config = stats_config(bins, reservoir, seed, prepared.stats_batch)
    identity = identity_of(
        prepared, methods=methods, measures=names, metric=metric,
        sweep=None if sweep is None else str(sweep), rollout_sources=rollout_sources,
        attention_keys=attention_keys, stats={"bins": bins, "reservoir": reservoir},
    )  # fmt: skip
    with open_run(
        out, "compare", identity, tokens=prepared.eval, command=command, force=force,
        on_status=on_status,
    ) as run, ex:  # fmt: skip
        save_counterfactual(run, prepared.counterfactual)
        stats = None
        if needs_stats(names):
            stats = job_stats(
                run, prepared, config, batch_size=batch_size, progress=progress,
                on_status=on_status,
            )  # fmt: skip
        if sweep is not None:
            _reuse_sweep(sweep, prepared, run, names, metric, on_status)
        finished = run.done_parts()
        parts = compare_plan(
            prepared.layout, names, metric=metric, rollout_sources=rollout_sources,
            attention_keys=attention_keys, skip=finished,
        )  # fmt: skip
        if on_status:
            on_status(f"measuring {', '.join(names)} on {len(prepared.eval)} examples ({metric})")
        ctx = prepared.context(stats, batch_size)
        execute(
            run, parts, ctx, progress=progress, desc="exact ablation",
            done=lambda p: all(key in finished for key in p.keys), save=_save_tables,
            executor=ex,
        )  # fmt: skip
        result = summarise(
            load_parts(run), reference=reference, n_boot=bootstrap, k=k, ci=ci, seed=seed,
            order=names,
        )  # fmt: skip
        run.save_table("per_example.parquet", result.per_example)
        run.save_table("scores.parquet", result.scores)
        run.save_table("agreement.csv", result.agreement)
        run.save_table("pairs.csv", result.pairs)
        figures = {
            "compare.png": compare_figure(result.scores, result.agreement),
            "recall_cost.png": recall_cost_figure(result.agreement),
        }
        for name, fig in figures.items():
            run.save_figure(name, fig)
        cost = None
        if targets:
            ref = _off_target_method(reference, methods)
            own = task or data
            cost = _off_target(
                prepared, result.scores, k, ref, metric, stats, targets, own=own, seed=seed,
                batch_size=batch_size,
            )  # fmt: skip
            run.save_table("off_target.csv", cost)
        summary = {
            r.measure: [round(r.spearman, 4), round(r.ci_low, 4), round(r.ci_high, 4),
                        round(r.topk_overlap, 4), round(r.cost_fraction, 4)]
            for r in result.agreement.itertuples()
        }  # fmt: skip
        run.set_status("complete", reference=reference, agreement=summary)
        return CompareResult(
            result.per_example, result.scores, result.agreement, result.pairs, cost, reference,
            run, figures,
        )  # fmt: skip


def _off_target_method(reference: str, methods: Sequence[str]) -> str:
    """The method ``--off-target`` ablates with: the reference's, else the first."""
    return reference.partition(":")[2] if reference.startswith("ablation:") else methods[0]


def _save_tables(run: RunDir, part: Part, tables: Any) -> None:
    """A compare part's tables, each under its own key."""
    for key, table in tables.items():
        run.save_part(key, table)


def _reuse_sweep(
    sweep: str | os.PathLike[str],
    prepared: Prepared,
    run: RunDir,
    names: Sequence[str],
    metric: str,
    on_status: Callable[[str], None] | None,
) -> None:
    """Save the per-example exact ablations of a ``--sweep`` run as this run's parts."""
    _, same = load_sweep(sweep, prepared)  # refuses another model or other data
    path = Path(sweep) / "per_example.parquet"
    if not same or not path.is_file():
        if on_status:
            why = "other blocks of the data" if not same else "no per-example data"
            on_status(f"--sweep {sweep}: {why}; computing the exact ablations here")
        return
    try:
        table = pd.read_parquet(path)
    except Exception as err:
        raise ConfigError(
            f"{path} is damaged ({err}); re-run that sweep to rewrite it, or omit --sweep"
        ) from None
    if not set(PER_EXAMPLE_COLUMNS) <= set(table.columns):
        raise ConfigError(f"{path} lacks the per-example columns {PER_EXAMPLE_COLUMNS}")
    done = run.done_parts()
    # exact patching is only the same measure when the sweep patched in the same inputs
    theirs = read_manifest(Path(sweep)).get("identity", {}).get("counterfactual_fingerprint")
    mine = prepared.identity().get("counterfactual_fingerprint")
    for n in (n for n in names if n.startswith("ablation:")):
        if n == "ablation:patch" and (mine is None or theirs != mine):
            continue
        rows = table[(table["measure"] == n) & (table["metric"] == metric)]
        for ly, part in rows.groupby("layer", sort=True):
            if part_key(n, int(ly)) not in done:
                run.save_part(part_key(n, int(ly)), part[PER_EXAMPLE_COLUMNS])


def _off_target(
    prepared: Prepared,
    scores: pd.DataFrame,
    k: int,
    method: str,
    metric: str,
    stats: Stats | None,
    targets: dict[str, tuple[Batch, str]],
    *,
    own: str | None,
    seed: int,
    batch_size: int,
) -> pd.DataFrame:
    """Ablate each measure's top-k heads (and k random ones) on this data and every target."""
    from headlab.analyses.cascade import off_target

    selections = {
        name: top_heads(g, "value", k) for name, g in scores.groupby("measure", sort=False)
    }
    selections["random"] = random_heads(prepared.layout, k, seed=seed)
    here = f"{own} (eval blocks)"  # the blocks the heads were selected on
    cost = off_target(
        prepared.model, selections, {here: (prepared.eval, metric), **targets}, method=method,
        stats=stats, batch_size=batch_size, layout=prepared.layout,
    )  # fmt: skip
    cost = cost.rename(columns={"selected_on": "selected_by"})
    cost.insert(1, "selected_on", own)
    return cost
