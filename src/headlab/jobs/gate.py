"""The ``headlab gate`` job: Causal Head Gating, or its contrastive variant, into a resumable run
directory.

Each fit is a part: :class:`~headlab.analyses.gates.CHGFitPart` ``zero``, then ``plus`` and
``minus`` (both start from the ``zero`` fit, so they run once it is done), or one
:class:`~headlab.analyses.gates.ContrastPart`. A finished fit is saved as
``theta-<fit>.safetensors`` with its loss curve as ``parts/curve-<fit>.parquet`` (the contrastive
fit also writes ``summary.csv``), so re-running the same command skips the finished fits; the head
table, the held-out scores, the validation (CHG: on the fitting sequences and on the held-out
statistics split, column ``split``) and the figures are recomputed on every run.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd
import torch
from matplotlib.figure import Figure

from headlab.analyses.gates import (
    FITS,
    CHGConfig,
    CHGFitPart,
    ContrastConfig,
    ContrastPart,
    ContrastResult,
    check_contrast,
    contrast_table,
    gate_nll,
    label_fits,
    loss_targets,
    validate_contrast,
    validate_labels,
)
from headlab.batch import Batch
from headlab.data.targets import target_batch
from headlab.data.tasks import TASKS
from headlab.defaults import (
    DEFAULT_GATE_MASKS,
    DEFAULT_GATE_STEPS,
    DEFAULT_MODEL,
    DEFAULT_N_STATS_BLOCKS,
)
from headlab.errors import ConfigError
from headlab.jobs.base import Say, check_count, execute, identity_of, load_parts, open_run
from headlab.jobs.executors import Executor, make_executor
from headlab.jobs.inputs import Inputs, Prepared, prepare
from headlab.metrics import get_metric
from headlab.parts import Context, Part
from headlab.plots.gate import chg_figures, contrast_figures
from headlab.runs import RunDir

__all__ = ["GateResult", "run_gate"]


@dataclass
class GateResult:
    """What :func:`run_gate` produced (``mode``: ``chg`` or ``contrast``)."""

    mode: str
    table: pd.DataFrame
    summary: pd.DataFrame
    curves: pd.DataFrame
    run_dir: RunDir
    validation: pd.DataFrame | None = None
    figures: dict[str, Figure] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class _Validation:
    """What ``--validate`` ablates (``None`` instead of this: no validation)."""

    k: int
    n_random: int
    metric: str


def run_gate(
    *,
    out: str | os.PathLike[str],
    model: str = DEFAULT_MODEL,
    data: str | None = "python-docs",
    task: str | None = None,
    steps: int = DEFAULT_GATE_STEPS,
    reg_steps: int | None = None,
    lam: float = 0.1,
    masks: int = DEFAULT_GATE_MASKS,
    lr: float | None = None,
    threshold: float = 0.5,
    official_start: bool = False,
    forget_task: str | None = None,
    forget_data: str | None = None,
    margin: float = 5.0,
    validate: bool = False,
    k: int = 5,
    n_random: int = 5,
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
) -> GateResult:
    """Run CHG (or contrastive CHG, given ``forget_task`` or ``forget_data``) and write a
    resumable run directory; mirrors ``headlab gate`` (see its ``--help`` for every option).

    ``batch_size`` is examples per forward per mask. Each finished fit's ``theta`` is saved, so
    re-running the same command resumes after the last finished fit. Returns the head table, the
    NLL summary, the loss curves, the validation (with ``validate``) and the figures; prints
    nothing.
    """
    check_count("--batch-size", batch_size)
    check_count("--k", k)
    ex = make_executor(
        executor, ray_address=ray_address, workers=workers, gpus_per_worker=gpus_per_worker
    )
    check_count("--random", n_random, low=0)
    if forget_task is not None and forget_data is not None:
        raise ConfigError("give either --forget-task or --forget-data, not both")
    contrast = forget_task is not None or forget_data is not None
    common = dict(lam=lam, n_masks=masks, threshold=threshold, seed=seed)
    common["rows_per_forward"] = batch_size * masks
    config: CHGConfig | ContrastConfig
    if contrast:
        config = ContrastConfig(steps=steps, margin=margin, lr=lr or 0.1, **common)
    else:
        config = CHGConfig(
            steps=steps, reg_steps=reg_steps, lr=lr or 1.0, start_clipped=not official_start,
            **common,
        )  # fmt: skip
    inputs = Inputs(
        model=model, dtype=dtype, device=device, data=None if task else data, task=task,
        text_field=text_field, seq_len=seq_len, n_blocks=n_blocks, n_stats_blocks=n_stats_blocks,
        stats_data=stats_data, seed=seed, trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle, device_map=device_map, max_memory=max_memory,
        offload_folder=offload_folder,
    )  # fmt: skip
    if prepared is None:
        prepared = prepare(inputs, on_status=on_status)
    loss_targets(prepared.eval, "the task")  # fail before creating the run directory
    checks = None
    if validate:
        checks = _Validation(k, n_random, metric or prepared.metrics[0])
        get_metric(checks.metric)
    forget = _forget_batch(prepared, forget_task, forget_data) if contrast else None
    if forget is not None:
        check_contrast(prepared.eval, forget)
    settings = {k2: v for k2, v in asdict(config).items() if k2 != "rows_per_forward"}
    identity = identity_of(
        prepared, config=settings, forget_task=forget_task, forget_data=forget_data
    )
    with open_run(
        out, "gate-contrast" if contrast else "gate", identity, tokens=prepared.eval,
        command=command, force=force, on_status=on_status,
    ) as run, ex:  # fmt: skip
        batches = {} if forget is None else {"forget": forget}
        ctx = prepared.context(None, batch_size, batches)
        if isinstance(config, ContrastConfig):
            return _contrast(run, prepared, ctx, config, checks, progress, on_status, ex)
        return _chg(run, prepared, ctx, config, checks, progress, on_status, ex)


def _forget_batch(prepared: Prepared, forget_task: str | None, forget_data: str | None) -> Batch:
    """The forget set: ``n_blocks`` examples of a task, or blocks of a corpus (as long as the
    evaluation blocks of a corpus run; 128 tokens next to a task unless ``--seq-len``)."""
    inp = prepared.inputs
    if forget_task is not None:
        if forget_task not in TASKS:
            raise ConfigError(f"unknown task {forget_task!r}; built-in tasks: {', '.join(TASKS)}")
        name, seq = forget_task, inp.seq_len
    else:
        assert forget_data is not None
        if forget_data in TASKS:
            raise ConfigError(
                f"--forget-data {forget_data!r} is a built-in task; use --forget-task {forget_data}"
            )
        name = forget_data
        seq = inp.seq_len or (prepared.eval.seq_len if inp.task is None else 128)
    batch, _ = target_batch(
        name, prepared.tokenizer, n=inp.n_blocks, seed=inp.seed, seq_len=seq,
        text_field=inp.text_field,
    )  # fmt: skip
    return batch


def _theta(run: RunDir, fit: str) -> torch.Tensor | None:
    """The saved ``theta`` of ``fit`` (None: absent, or damaged and removed)."""
    tensors = run.load_tensors(f"theta-{fit}.safetensors")
    return None if tensors is None else tensors["value"]


def _saved_thetas(run: RunDir, fits: tuple[str, ...]) -> dict[str, torch.Tensor]:
    thetas = {f: _theta(run, f) for f in fits}
    lost = [f for f, t in thetas.items() if t is None]
    if lost:
        raise ConfigError(
            f"the theta of fit {', '.join(lost)} in {run.path} vanished while the job ran; "
            "re-run the same command to refit it"
        )
    return {f: t for f, t in thetas.items() if t is not None}


def _save_fit(run: RunDir, part: Part, output: tuple[torch.Tensor, pd.DataFrame]) -> None:
    theta, curve = output
    assert isinstance(part, CHGFitPart)
    run.save_part(part.key, curve)
    run.save_tensors(f"theta-{part.fit}.safetensors", {"value": theta})


def _chg(
    run: RunDir,
    prepared: Prepared,
    ctx: Context,
    config: CHGConfig,
    checks: _Validation | None,
    progress: bool,
    say: Say,
    executor: Executor,
) -> GateResult:
    parts = run.done_parts()  # a fit is done when both its theta and its loss curve are intact
    done = [f for f in FITS if f"curve-{f}" in parts and _theta(run, f) is not None]
    if done and say:
        say(f"resuming: fits {', '.join(done)} already done")
    finished = {f"curve-{f}" for f in done}
    opts: dict[str, Any] = dict(
        progress=progress, desc="gate fits", unit="step", done=lambda p: p.key in finished,
        save=_save_fit, executor=executor,
    )  # fmt: skip
    execute(run, [CHGFitPart("zero", config)], ctx, **opts)
    zero = _saved_thetas(run, ("zero",))["zero"]  # the start of the regularised fits
    execute(run, [CHGFitPart(f, config, zero) for f in FITS if f != "zero"], ctx, **opts)
    thetas = _saved_thetas(run, FITS)
    table, fit_nll = label_fits(
        prepared.model, prepared.eval, thetas, config, layout=prepared.layout
    )
    curves = load_parts(run, "curve-")
    for name in ("heads.parquet", "heads.csv"):
        run.save_table(name, table)
    if say:
        say("scoring the fitted gates on the held-out statistics split")
    heldout = gate_nll(
        prepared.model, prepared.stats_batch, {f: torch.sigmoid(t) for f, t in thetas.items()},
        layout=prepared.layout, rows_per_forward=config.rows_per_forward,
    )  # fmt: skip
    summary = pd.concat(
        [fit_nll.assign(split="fit"), heldout.assign(split="heldout")], ignore_index=True
    )
    run.save_table("summary.csv", summary)
    run.save_table("curves.parquet", curves)
    figures = chg_figures(table, curves)
    validation = None
    if checks is not None:
        if say:
            say(f"validating: zeroing top-{checks.k} facilitating, interfering and random heads "
                "on the fitting and the held-out sequences")  # fmt: skip
        validation = pd.concat(
            [validate_labels(
                prepared.model, batch, table, k=checks.k, n_random=checks.n_random,
                seed=prepared.inputs.seed, metric=checks.metric, layout=prepared.layout,
                batch_size=ctx.batch_size,
            ).assign(split=split) for split, batch in (("fit", prepared.eval),
                                                       ("heldout", prepared.stats_batch))],
            ignore_index=True,
        )  # fmt: skip
    counts = table["label"].value_counts().to_dict()
    labels = {str(a): int(b) for a, b in counts.items()}
    _finish(run, validation, figures, labels=labels)
    return GateResult("chg", table, summary, curves, run, validation, figures)


def _save_contrast(run: RunDir, part: Part, res: ContrastResult) -> None:
    run.save_part(part.key, res.curves)
    run.save_table("summary.csv", res.summary)
    run.save_tensors("theta-contrast.safetensors", {"value": res.theta})


def _contrast(
    run: RunDir,
    prepared: Prepared,
    ctx: Context,
    config: ContrastConfig,
    checks: _Validation | None,
    progress: bool,
    say: Say,
    executor: Executor,
) -> GateResult:
    theta = _theta(run, "contrast")
    summary_ok = run.verified("summary.csv") is not None  # the fit's summary or curve lost: refit
    done = theta is not None and summary_ok and "curve-contrast" in run.done_parts()
    if done and say:
        say("resuming: the contrastive fit is already done")
    fitted: list[ContrastResult] = []
    execute(
        run, [ContrastPart(config)], ctx, progress=progress, desc="contrastive fit", unit="step",
        done=lambda p: done, save=_save_contrast, on_done=lambda p, res: fitted.append(res),
        executor=executor,
    )  # fmt: skip
    if fitted:
        table, summary = fitted[0].table, fitted[0].summary
    else:
        theta = _saved_thetas(run, ("contrast",))["contrast"]
        table = contrast_table(torch.sigmoid(theta), config.threshold)
        summary = pd.read_csv(run.file("summary.csv"))
    curves = load_parts(run, "curve-")
    for name in ("heads.parquet", "heads.csv"):
        run.save_table(name, table)
    figures = contrast_figures(table, curves)
    validation = None
    if checks is not None:
        validation = validate_contrast(
            prepared.model, prepared.eval, ctx.batches["forget"], table, k=checks.k,
            n_random=checks.n_random, seed=prepared.inputs.seed, metric=checks.metric,
            layout=prepared.layout, batch_size=ctx.batch_size,
        )  # fmt: skip
    forget_specific = int((table["role"] == "forget-specific").sum())
    _finish(run, validation, figures, forget_specific=forget_specific)
    return GateResult("contrast", table, summary, curves, run, validation, figures)


def _finish(
    run: RunDir, validation: pd.DataFrame | None, figures: dict[str, Figure], **status: Any
) -> None:
    if validation is not None:
        run.save_table("validation.csv", validation)
    for name, fig in figures.items():
        run.save_figure(name, fig)
    run.set_status("complete", **status)
