"""The ``headlab l0`` job: sweep the L0 penalty weight, resumably, into a run directory.

Each penalty weight is a part (:class:`~headlab.analyses.gates.L0FitPart`); a finished weight's
``log_alpha`` is saved as ``log_alpha-<lam>.safetensors`` with its loss curve as
``parts/curve-lam<lam>.parquet``, so re-running the same command fits only the missing weights.
The trade-off table, the per-head table and the figures are recomputed on every run.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import pandas as pd
import torch
from matplotlib.figure import Figure

from headlab.analyses.gates import L0Config, L0FitPart, check_l0_lambdas, l0_evaluate
from headlab.defaults import (
    DEFAULT_L0_LAMBDAS,
    DEFAULT_L0_STEPS,
    DEFAULT_MODEL,
    DEFAULT_N_STATS_BLOCKS,
)
from headlab.errors import ConfigError
from headlab.jobs.base import check_count, execute, identity_of, load_parts, open_run
from headlab.jobs.executors import Executor, make_executor
from headlab.jobs.inputs import Inputs, Prepared, prepare
from headlab.metrics import get_metric
from headlab.parts import Part
from headlab.plots.l0 import l0_figures
from headlab.runs import RunDir

__all__ = ["L0Result", "run_l0"]


@dataclass
class L0Result:
    """What :func:`run_l0` produced: per-weight table, per-head table, curves, run directory."""

    table: pd.DataFrame
    heads: pd.DataFrame
    curves: pd.DataFrame
    run_dir: RunDir
    figures: dict[str, Figure] = field(default_factory=dict, repr=False)


def run_l0(
    *,
    out: str | os.PathLike[str],
    model: str = DEFAULT_MODEL,
    data: str | None = "python-docs",
    task: str | None = None,
    lams: Sequence[float] = DEFAULT_L0_LAMBDAS,
    steps: int = DEFAULT_L0_STEPS,
    lr: float = 0.3,
    samples: int = 1,
    metric: str | None = None,
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
) -> L0Result:
    """Fit hard-concrete gates at every penalty weight in ``lams`` and write a resumable run
    directory; mirrors ``headlab l0`` (see its ``--help`` for every option).

    ``batch_size`` is examples per forward per gate sample. Returns the trade-off table, the
    per-head table, the loss curves and the figures; prints nothing.
    """
    check_count("--batch-size", batch_size)
    ex = make_executor(
        executor, ray_address=ray_address, workers=workers, gpus_per_worker=gpus_per_worker
    )
    lams = [float(x) for x in lams]
    check_l0_lambdas(lams)
    config = L0Config(
        steps=steps, lr=lr, n_samples=samples, rows_per_forward=batch_size * samples, seed=seed
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
    metric = metric or prepared.metrics[0]
    get_metric(metric)  # before any run directory
    settings = {k: v for k, v in asdict(config).items() if k != "rows_per_forward"}
    with open_run(
        out, "l0", identity_of(prepared, config=settings), tokens=prepared.eval, command=command,
        force=force, on_status=on_status,
    ) as run, ex:  # fmt: skip
        parts = [L0FitPart(lam, config) for lam in lams]
        done = run.done_parts()  # a fit is done when its gates and its loss curve are intact
        fitted = [p for p in parts if p.key in done and _log_alpha(run, p.lam) is not None]
        if fitted and on_status:
            on_status(f"resuming: lam {', '.join(f'{p.lam:g}' for p in fitted)} already fitted")
        finished = {p.key for p in fitted}
        ctx = prepared.context(None, batch_size)
        execute(
            run, parts, ctx, progress=progress, desc="l0 fits", unit="step",
            done=lambda p: p.key in finished, save=_save_fit, executor=ex,
        )  # fmt: skip
        log_alphas = {lam: _saved_log_alpha(run, lam) for lam in lams}
        table, heads = l0_evaluate(
            prepared.model, prepared.eval, lams, log_alphas, config, metric=metric,
            layout=prepared.layout, heldout=prepared.stats_batch,
        )  # fmt: skip
        curves = load_parts(run, "curve-")
        run.save_table("tradeoff.csv", table)
        run.save_table("tradeoff.parquet", table)
        run.save_table("heads.parquet", heads)
        run.save_table("curves.parquet", curves)
        figures = l0_figures(table, curves)
        for name, fig in figures.items():
            run.save_figure(name, fig)
        run.set_status("complete", kept={f"{r.lam:g}": int(r.n_kept) for r in table.itertuples()})
        return L0Result(table, heads, curves, run, figures)


def _file(lam: float) -> str:
    return f"log_alpha-{lam:g}.safetensors"


def _log_alpha(run: RunDir, lam: float) -> torch.Tensor | None:
    """The saved ``log_alpha`` of ``lam`` (None: absent, or damaged and removed)."""
    tensors = run.load_tensors(_file(lam))
    return None if tensors is None else tensors["value"]


def _saved_log_alpha(run: RunDir, lam: float) -> torch.Tensor:
    log_alpha = _log_alpha(run, lam)
    if log_alpha is None:
        raise ConfigError(
            f"{_file(lam)} in {run.path} vanished while the job ran; re-run the same command to "
            "refit it"
        )
    return log_alpha


def _save_fit(run: RunDir, part: Part, output: tuple[torch.Tensor, pd.DataFrame]) -> None:
    log_alpha, curve = output
    assert isinstance(part, L0FitPart)
    run.save_part(part.key, curve)
    run.save_tensors(_file(part.lam), {"value": log_alpha})
