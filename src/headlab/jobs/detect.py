"""The ``headlab detect`` job: score every head with the TransformerLens detectors (and the ARENA
diagonal scores on repeated batches) into a run directory (part ``detect``, ``results.parquet``,
``detect.png``, the top heads per detector in the manifest)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pandas as pd
from matplotlib.figure import Figure

from headlab.analyses.detect import DETECTORS, DetectPart, top_heads
from headlab.defaults import DEFAULT_N_STATS_BLOCKS
from headlab.errors import ConfigError
from headlab.jobs.base import check_count, execute, identity_of, load_parts, open_run
from headlab.jobs.executors import Executor, make_executor
from headlab.jobs.inputs import Inputs, Prepared, prepare
from headlab.models.load import DEFAULT_MODEL
from headlab.plots.detect import detect_figure
from headlab.runs import RunDir

__all__ = ["DetectResult", "run_detect"]


@dataclass
class DetectResult:
    """What :func:`run_detect` produced.

    Attributes:
        table: every head's score per detector (:func:`headlab.analyses.detect.detect_heads`).
        top_heads: per detector, its best heads as ``[layer, head, score]`` (score rounded to 4
            decimals), as in the manifest.
        run_dir: the run directory.
        threshold: the score that counts as a detection.
        figures: ``{"detect.png": Figure}``.
    """

    table: pd.DataFrame
    top_heads: dict[str, list[list]]
    run_dir: RunDir
    threshold: float
    figures: dict[str, Figure] = field(default_factory=dict, repr=False)


def run_detect(
    *,
    out: str | os.PathLike[str],
    model: str = DEFAULT_MODEL,
    data: str | None = None,
    task: str | None = None,
    detectors: Sequence[str] = DETECTORS,
    measure: str = "mul",
    exclude_bos: bool = False,
    exclude_current_token: bool = False,
    threshold: float = 0.4,
    top: int = 5,
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
    executor: str | Executor = "serial",
    ray_address: str | None = None,
    workers: int | None = None,
    gpus_per_worker: float = 0.0,
    force: bool = False,
    progress: bool = False,
    on_status: Callable[[str], None] | None = None,
    command: list[str] | None = None,
    prepared: Prepared | None = None,
) -> DetectResult:
    """Score every head with each detector and write a resumable run directory.

    Mirrors ``headlab detect``; see ``headlab detect --help`` for the meaning of every option.
    Without ``data`` or ``task`` it runs on the ``induction`` task. Returns the table, the top
    heads per detector and the figure; prints nothing.
    """
    detectors = list(detectors)
    for d in detectors:
        if d not in DETECTORS:
            raise ConfigError(f"unknown detector {d!r}; choose from {', '.join(DETECTORS)}")
    if measure not in ("mul", "abs"):
        raise ConfigError(f"measure must be 'mul' or 'abs' (TransformerLens), got {measure!r}")
    if not 0 <= threshold <= 1:
        raise ConfigError(f"--threshold must be in [0, 1], got {threshold}")
    check_count("--top", top)
    check_count("--batch-size", batch_size)
    ex = make_executor(
        executor, ray_address=ray_address, workers=workers, gpus_per_worker=gpus_per_worker
    )
    if task is None and not data:
        task, data = "induction", None
    inputs = Inputs(
        model=model, dtype=dtype, device=device, data=None if task else data, task=task,
        text_field=text_field, seq_len=seq_len, n_blocks=n_blocks, n_stats_blocks=n_stats_blocks,
        stats_data=stats_data, seed=seed, trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle, device_map=device_map, max_memory=max_memory,
        offload_folder=offload_folder,
    )  # fmt: skip
    if prepared is None:
        prepared = prepare(inputs, on_status=on_status)
    part = DetectPart(tuple(detectors), measure, exclude_bos, exclude_current_token)
    identity = identity_of(
        prepared, detectors=detectors, measure=measure, exclude_bos=exclude_bos,
        exclude_current_token=exclude_current_token,
    )  # fmt: skip
    with open_run(
        out, "detect", identity, tokens=prepared.eval, command=command, force=force,
        on_status=on_status,
    ) as run, ex:  # fmt: skip
        ctx = prepared.context(None, batch_size)
        execute(run, [part], ctx, progress=progress, desc="detect", executor=ex)
        table = load_parts(run, part.key)
        run.save_table("results.parquet", table)
        figures = {"detect.png": detect_figure(table, threshold=threshold)}
        for name, fig in figures.items():
            run.save_figure(name, fig)
        best = _top_heads(table, top)
        run.set_status("complete", top_heads=best)
        return DetectResult(table, best, run, threshold, figures)


def _top_heads(table: pd.DataFrame, k: int) -> dict[str, list[list]]:
    """``{detector: [[layer, head, score], ...]}``: the ``k`` best heads of every detector in
    the table's order (ties by layer, head), scores rounded to 4 decimals."""
    score = table.set_index(["metric", "layer", "head"])["value"]
    out = {}
    for metric in table["metric"].unique():
        heads = top_heads(table, metric, k)
        out[metric] = [[ly, h, round(float(score[(metric, ly, h)]), 4)] for ly, h in heads]
    return out
