"""Jobs: load a model and data, run an analysis into a run directory. The CLI calls these, and
so can a notebook (``headlab.run_sweep(...)`` mirrors ``headlab sweep``)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd
from matplotlib.figure import Figure
from torch import nn

from headlab.analyses.sweep import check_heads, part_key, rank_heads, sweep_parts, tidy
from headlab.batch import Batch
from headlab.errors import ConfigError
from headlab.interventions import intervention_from_name
from headlab.metrics import get_metric
from headlab.models.layout import Layout, describe, max_positions
from headlab.models.load import DEFAULT_MODEL, cached_fingerprint, load_model
from headlab.plots import heatmap
from headlab.runs import RunDir
from headlab.stats import Stats, StatsConfig, collect_stats

__all__ = ["Inputs", "Prepared", "SweepResult", "prepare", "run_sweep", "sweep_figures"]


@dataclass(frozen=True)
class Inputs:
    """Which model and data a job runs on (the shared CLI options)."""

    model: str = DEFAULT_MODEL
    dtype: str = "float32"
    device: str = "cpu"
    data: str | None = "python-docs"
    task: str | None = None
    text_field: str = "text"
    seq_len: int | None = None
    n_blocks: int = 8
    n_stats_blocks: int = 16
    stats_data: str | None = None
    seed: int = 0
    trust_remote_code: bool = False
    allow_pickle: bool = False

    def __post_init__(self) -> None:
        if self.task is not None and self.data not in (None, "python-docs"):
            raise ConfigError("give either --data or --task, not both")
        if self.seq_len is not None and self.seq_len < 1:
            raise ConfigError(f"--seq-len must be a positive integer, got {self.seq_len}")
        if self.n_blocks < 1:
            raise ConfigError(f"--n-blocks must be at least 1, got {self.n_blocks}")
        if self.n_stats_blocks < 1:
            raise ConfigError(f"--n-stats-blocks must be at least 1, got {self.n_stats_blocks}")


@dataclass
class Prepared:
    """A loaded model with its evaluation and statistics batches."""

    inputs: Inputs
    model: nn.Module
    tokenizer: Any
    layout: Layout
    eval: Batch
    stats_batch: Batch
    metrics: list[str]
    model_fingerprint: str

    def identity(self) -> dict[str, Any]:
        from headlab.data.blocks import batch_fingerprint

        inputs = asdict(self.inputs)
        # how the weights file may be read does not change the numbers (the fingerprint names the
        # weights); trust_remote_code stays when set: custom code is the forward pass itself (it
        # is left out when off, so run directories of releases without the option still resume)
        del inputs["allow_pickle"]
        if not inputs["trust_remote_code"]:
            del inputs["trust_remote_code"]
        return {
            **inputs,
            "device": None,  # where it ran does not change the numbers' identity
            "model_fingerprint": self.model_fingerprint,
            "eval_fingerprint": batch_fingerprint(self.eval),
            "stats_fingerprint": batch_fingerprint(self.stats_batch),
        }


def prepare(inputs: Inputs, *, on_status: Callable[[str], None] | None = None) -> Prepared:
    """Load the model and build the evaluation and statistics batches."""
    from headlab.data.blocks import make_blocks
    from headlab.data.corpora import load_texts
    from headlab.data.tasks import load_task

    model, tokenizer = load_model(
        inputs.model,
        dtype=inputs.dtype,
        device=inputs.device,
        on_status=on_status,
        trust_remote_code=inputs.trust_remote_code,
        allow_pickle=inputs.allow_pickle,
    )
    layout = describe(model)
    if tokenizer is None or not callable(getattr(tokenizer, "encode", None)):
        raise ConfigError(
            f"{inputs.model} has no text tokenizer; the CLI works on text models (use the Python "
            "API with your own Batch of pixel_values for vision models)"
        )
    max_pos = max_positions(model)
    if inputs.task is not None:
        seq = inputs.seq_len if inputs.task == "induction" else None
        task = load_task(inputs.task, tokenizer, n=inputs.n_blocks, seed=inputs.seed, seq_len=seq)
        evaluation, metric = task.eval, task.metric
        # the statistics split has its own size; its examples come from a disjoint seed stream
        stats_batch = load_task(
            inputs.task, tokenizer, n=inputs.n_stats_blocks, seed=inputs.seed, seq_len=seq
        ).stats
        if max_pos is not None and evaluation.seq_len > max_pos:
            raise ConfigError(
                f"task {inputs.task!r} needs {evaluation.seq_len} positions but the model has "
                f"{max_pos}; use a shorter --seq-len"
            )
        if inputs.stats_data is not None:
            texts = load_texts(inputs.stats_data, text_field=inputs.text_field)
            _, stats_batch = make_blocks(
                tokenizer,
                texts,
                seq_len=evaluation.seq_len,
                n_blocks=1,
                n_stats_blocks=inputs.n_stats_blocks,
                seed=inputs.seed,
                max_positions=max_pos,
            )
        metrics = [metric]
    else:
        if inputs.data is None:
            raise ConfigError("give --data NAME_OR_PATH or --task NAME")
        texts = load_texts(inputs.data, text_field=inputs.text_field)
        evaluation, stats_batch = make_blocks(
            tokenizer,
            texts,
            seq_len=inputs.seq_len or 128,
            n_blocks=inputs.n_blocks,
            n_stats_blocks=inputs.n_stats_blocks,
            seed=inputs.seed,
            max_positions=max_pos,
        )
        if inputs.stats_data is not None:
            other = load_texts(inputs.stats_data, text_field=inputs.text_field)
            _, stats_batch = make_blocks(
                tokenizer,
                other,
                seq_len=evaluation.seq_len,
                n_blocks=1,
                n_stats_blocks=inputs.n_stats_blocks,
                seed=inputs.seed + 1,
                max_positions=max_pos,
            )
        metrics = ["ce"]
    return Prepared(
        inputs,
        model,
        tokenizer,
        layout,
        evaluation,
        stats_batch,
        metrics,
        cached_fingerprint(model),  # computed once: statistics and their checks reuse it
    )


@dataclass
class SweepResult:
    """What :func:`run_sweep` produced."""

    table: pd.DataFrame
    ranking: pd.DataFrame
    run_dir: RunDir
    figures: dict[str, Figure] = field(default_factory=dict, repr=False)

    def top(self, k: int = 5) -> pd.DataFrame:
        """The ``k`` most important heads per method and metric."""
        return self.ranking[self.ranking["rank"] <= k]


def sweep_figures(table: pd.DataFrame) -> dict[str, Figure]:
    """One heatmap per (method, metric): ``{"heatmap_zero_ce.png": Figure, ...}``."""
    out = {}
    for (method, metric), _ in table.groupby(["method", "metric"], sort=True):
        name = f"heatmap_{method.replace(':', '_')}_{metric}.png"
        out[name] = heatmap(table, method=method, metric=metric)
    return out


def _progress(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="ex", dynamic_ncols=True)


def run_sweep(
    *,
    out: str | os.PathLike[str],
    model: str = DEFAULT_MODEL,
    data: str | None = "python-docs",
    task: str | None = None,
    methods: Sequence[str] = ("zero", "mean", "peak"),
    metrics: Sequence[str] | None = None,
    heads: Sequence[tuple[int, int]] | None = None,
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
    batch_size: int = 8,
    bins: int = 1000,
    reservoir: int = 16,
    force: bool = False,
    progress: bool = False,
    on_status: Callable[[str], None] | None = None,
    command: list[str] | None = None,
    prepared: Prepared | None = None,
) -> SweepResult:
    """Ablate every head alone under each method and write a resumable run directory.

    Mirrors ``headlab sweep``; see ``headlab sweep --help`` for the meaning of every option.
    Returns the tidy table, the ranking and the figures; prints nothing unless ``progress``.
    """
    ivs = [intervention_from_name(m) for m in methods]
    if not ivs:
        raise ConfigError("give at least one --method")
    inputs = Inputs(
        model=model,
        dtype=dtype,
        device=device,
        data=None if task else data,
        task=task,
        text_field=text_field,
        seq_len=seq_len,
        n_blocks=n_blocks,
        n_stats_blocks=n_stats_blocks,
        stats_data=stats_data,
        seed=seed,
        trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle,
    )
    if heads is not None:
        heads = check_heads(heads)  # repeats and non-pairs: refused before loading anything
    if prepared is None:
        prepared = prepare(inputs, on_status=on_status)
    if heads is not None:
        heads = check_heads(heads, prepared.layout)  # beyond the model: before any run directory
    metric_names = list(metrics) if metrics else prepared.metrics
    for m in metric_names:
        get_metric(m)
    config = StatsConfig(bins=bins, reservoir=min(reservoir, len(prepared.stats_batch)), seed=seed)
    identity = {
        **prepared.identity(),
        "methods": list(methods),
        "metrics": metric_names,
        "heads": None if heads is None else [list(h) for h in heads],
        "stats_config": asdict(config),
    }
    run = RunDir.open(
        out, kind="sweep", identity=identity, command=command, force=force, on_status=on_status
    )
    try:
        return _execute(
            run,
            prepared,
            list(methods),
            metric_names,
            heads,
            config,
            batch_size,
            progress,
            on_status,
        )
    except KeyboardInterrupt:
        run.set_status("interrupted")
        raise
    finally:
        run.close()


def _execute(
    run: RunDir,
    prepared: Prepared,
    methods: list[str],
    metric_names: list[str],
    heads: Sequence[tuple[int, int]] | None,
    config: StatsConfig,
    batch_size: int,
    progress: bool,
    on_status: Callable[[str], None] | None,
) -> SweepResult:
    model, layout = prepared.model, prepared.layout
    if not run.file("tokens.safetensors").is_file():
        run.save_tokens(prepared.eval)
    stats_path = run.verified("stats.safetensors")
    if stats_path is not None:
        stats = Stats.load(stats_path, model=model)
    else:
        if on_status:
            on_status(f"collecting statistics on {len(prepared.stats_batch)} inputs")
        stats = collect_stats(
            model, prepared.stats_batch, config=config, batch_size=batch_size, progress=progress
        )
        with run.atomic("stats.safetensors") as tmp:
            stats.save(tmp)
    chosen = list(heads) if heads is not None else layout.heads()
    done = run.done_parts()
    per_layer: dict[int, int] = {}
    for ly, _ in chosen:
        per_layer[ly] = per_layer.get(ly, 0) + 1
    todo = [(m, ly) for m in methods for ly in per_layer if part_key(m, ly) not in done]
    total = sum(per_layer[ly] for _, ly in todo) * len(prepared.eval)
    bar = _progress(progress, total, "sweep")
    try:
        for part in sweep_parts(
            model,
            prepared.eval,
            methods=methods,
            metrics=metric_names,
            stats=stats,
            heads=chosen,
            batch_size=batch_size,
            skip=done,
            layout=layout,
            on_forward=bar.update if bar is not None else None,
        ):
            run.save_part(part.key, part.table)
    finally:
        if bar is not None:
            bar.close()
    table = tidy(run.load_parts())
    expected = len(methods) * len(chosen) * len(metric_names)
    if len(table) != expected:
        raise ConfigError(f"run directory {run.path} holds {len(table)} rows, expected {expected}")
    ranking = rank_heads(table)
    run.save_table("results.parquet", table)
    run.save_table("ranking.csv", ranking)
    figures = sweep_figures(table)
    for name, fig in figures.items():
        run.save_figure(name, fig)
    run.set_status(
        "complete",
        baseline={m: float(table[table.metric == m]["baseline"].iloc[0]) for m in metric_names},
        top_heads={
            f"{meth}/{met}": [
                [int(r.layer), int(r.head), float(r.delta)] for r in g.head(5).itertuples()
            ]
            for (meth, met), g in ranking.groupby(["method", "metric"], sort=True)
        },
    )
    return SweepResult(table, ranking, run, figures)
