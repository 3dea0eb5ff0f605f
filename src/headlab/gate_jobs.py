"""The ``headlab gate`` job: load, fit (resumably), label, validate, write the run directory.

:func:`run_gate` mirrors the command for notebooks. Each finished fit's ``theta`` is saved as
``theta-<fit>.safetensors`` (and its loss curve as ``parts/curve-<fit>.parquet``), so re-running the
same command skips the finished fits.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd
import torch
from matplotlib.figure import Figure

from headlab.runs import RunDir

__all__ = [
    "DEFAULT_MASKS",
    "DEFAULT_STEPS",
    "GateRun",
    "load_tensor",
    "progress_bar",
    "run_gate",
    "save_tensor",
]

#: CPU-sized defaults of the command (the paper: 500 updates, 10 masks)
DEFAULT_STEPS = 100
DEFAULT_MASKS = 2


@dataclass
class GateRun:
    """What :func:`run_gate` produced."""

    mode: str
    table: pd.DataFrame
    summary: pd.DataFrame
    curves: pd.DataFrame
    run_dir: RunDir
    validation: pd.DataFrame | None = None
    figures: dict[str, Figure] = field(default_factory=dict, repr=False)


def save_tensor(run: RunDir, name: str, tensor: torch.Tensor) -> None:
    """Write one tensor to ``run/name`` atomically (its checksum in the manifest)."""
    run.save_tensors(name, {"value": tensor})


def load_tensor(run: RunDir, name: str) -> torch.Tensor | None:
    """The tensor of ``run/name``; None when absent or damaged (then removed and reported)."""
    tensors = run.load_tensors(name)
    return None if tensors is None else tensors["value"]


def progress_bar(enabled: bool, total: int, desc: str) -> Any:
    """A tqdm bar over updates (``None`` when disabled or nothing is left)."""
    if not enabled or total <= 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True)


def _forget_batch(prepared: Any, forget_task: str | None, forget_data: str | None) -> Any:
    from headlab.data.blocks import make_blocks
    from headlab.data.corpora import load_texts
    from headlab.data.tasks import load_task

    inp = prepared.inputs
    if forget_task is not None:
        seq = inp.seq_len if forget_task == "induction" else None
        return load_task(
            forget_task, prepared.tokenizer, n=inp.n_blocks, seed=inp.seed, seq_len=seq
        ).eval
    texts = load_texts(forget_data, text_field=inp.text_field)
    seq = inp.seq_len or (prepared.eval.seq_len if inp.task is None else 128)
    return make_blocks(
        prepared.tokenizer,
        texts,
        seq_len=seq,
        n_blocks=inp.n_blocks,
        n_stats_blocks=1,
        seed=inp.seed,
    )[0]


@dataclass(frozen=True)
class _Job:
    """What the execution steps share."""

    run: RunDir
    prepared: Any  # headlab.jobs.Prepared
    batch_size: int
    progress: bool
    on_status: Callable[[str], None] | None
    validate: bool
    k: int
    n_random: int
    metric: str | None

    def say(self, msg: str) -> None:
        if self.on_status is not None:
            self.on_status(msg)


def run_gate(
    *,
    out: str | os.PathLike[str],
    steps: int = DEFAULT_STEPS,
    reg_steps: int | None = None,
    lam: float = 0.1,
    masks: int = DEFAULT_MASKS,
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
    batch_size: int = 8,
    force: bool = False,
    progress: bool = False,
    on_status: Callable[[str], None] | None = None,
    command: list[str] | None = None,
    **data: Any,
) -> GateRun:
    """Run CHG (or contrastive CHG, given ``forget_task`` or ``forget_data``) and write a run
    directory; mirrors ``headlab gate`` (see its ``--help`` for every option).

    ``data`` takes the shared model/data options of :class:`headlab.jobs.Inputs` (``model``,
    ``task``, ``data``, ``n_blocks``, ``seq_len``, ``seed`` ...). ``batch_size`` is examples per
    forward per mask. Each finished fit's ``theta`` is saved, so re-running the same command
    resumes after the last finished fit; validation is recomputed on every run.
    """
    from headlab.analyses.gates import loss_targets
    from headlab.analyses.gates_chg import CHGConfig
    from headlab.analyses.gates_contrast import ContrastConfig, check_contrast
    from headlab.jobs import Inputs, prepare

    contrast = forget_task is not None or forget_data is not None
    common = dict(lam=lam, n_masks=masks, threshold=threshold, seed=data.get("seed", 0))
    common["rows_per_forward"] = max(1, batch_size) * masks
    config: Any
    if contrast:
        config = ContrastConfig(steps=steps, margin=margin, lr=lr or 0.1, **common)
    else:
        config = CHGConfig(
            steps=steps,
            reg_steps=reg_steps,
            lr=lr or 1.0,
            start_clipped=not official_start,
            **common,
        )
    prepared = prepare(Inputs(**data), on_status=on_status)
    loss_targets(prepared.eval, "the task")  # fail before creating the run directory
    forget = _forget_batch(prepared, forget_task, forget_data) if contrast else None
    if forget is not None:
        check_contrast(prepared.eval, forget)
    settings = {k2: v for k2, v in asdict(config).items() if k2 != "rows_per_forward"}
    identity = {
        **prepared.identity(),
        "config": settings,
        "forget_task": forget_task,
        "forget_data": forget_data,
    }
    kind = "gate-contrast" if contrast else "gate"
    run = RunDir.open(
        out, kind=kind, identity=identity, command=command, force=force, on_status=on_status
    )
    job = _Job(run, prepared, batch_size, progress, on_status, validate, k, n_random, metric)
    try:
        if not run.file("tokens.safetensors").is_file():
            run.save_tokens(prepared.eval)
        if contrast:
            return _execute_contrast(job, forget, config)
        return _execute(job, config)
    except KeyboardInterrupt:
        run.set_status("interrupted")
        raise
    finally:
        run.close()


def _execute(job: _Job, config: Any) -> GateRun:
    from headlab.analyses.gates_chg import FITS, chg, gate_nll
    from headlab.analyses.gates_plots import gate_heatmap, label_map, loss_curves
    from headlab.analyses.gates_validate import validate_labels

    run, prepared = job.run, job.prepared
    parts = run.done_parts()  # a fit is done when both its theta and its loss curve are intact
    done = {
        f: t
        for f in FITS
        if f"curve-{f}" in parts and (t := load_tensor(run, f"theta-{f}.safetensors")) is not None
    }
    if done:
        job.say(f"resuming: fits {', '.join(done)} already done")
    total = sum(config.steps_of(f) for f in FITS if f not in done)
    bar = progress_bar(job.progress, total, "gate fits")

    def on_step(fit: str, step: int, values: dict[str, float]) -> None:
        if bar is not None:
            bar.set_postfix(fit=fit, nll=f"{values['nll']:.3f}", refresh=False)
            bar.update(1)

    def on_fit(fit: str, theta: torch.Tensor, curve: pd.DataFrame) -> None:
        run.save_part(f"curve-{fit}", curve)
        save_tensor(run, f"theta-{fit}.safetensors", theta)

    try:
        res = chg(
            prepared.model,
            prepared.eval,
            config,
            layout=prepared.layout,
            done=done,
            on_fit=on_fit,
            on_step=on_step,
        )
    finally:
        if bar is not None:
            bar.close()
    curves = run.load_parts()
    for name, table in (("heads.parquet", res.table), ("heads.csv", res.table)):
        run.save_table(name, table)
    job.say("scoring the fitted gates on the held-out statistics split")
    gates = {f: torch.sigmoid(t) for f, t in res.thetas.items()}
    heldout = gate_nll(
        prepared.model,
        prepared.stats_batch,
        gates,
        layout=prepared.layout,
        rows_per_forward=config.rows_per_forward,
    )
    summary = pd.concat(
        [res.summary.assign(split="fit"), heldout.assign(split="heldout")], ignore_index=True
    )
    run.save_table("summary.csv", summary)
    run.save_table("curves.parquet", curves)
    figures = {
        "gate_plus.png": gate_heatmap(res.table, "g_plus", title="G+ (fit with +lam: keep)"),
        "gate_minus.png": gate_heatmap(res.table, "g_minus", title="G- (fit with -lam: remove)"),
        "labels.png": label_map(res.table, title="CHG head taxonomy"),
        "loss_curves.png": loss_curves(curves, "fit"),
    }
    validation = None
    if job.validate:
        job.say(f"validating: zeroing top-{job.k} facilitating, interfering and random heads")
        validation = validate_labels(
            prepared.model,
            prepared.eval,
            res.table,
            k=job.k,
            n_random=job.n_random,
            seed=prepared.inputs.seed,
            metric=job.metric or prepared.metrics[0],
            layout=prepared.layout,
            batch_size=job.batch_size,
        )
        run.save_table("validation.csv", validation)
    for name, fig in figures.items():
        run.save_figure(name, fig)
    counts = res.table["label"].value_counts().to_dict()
    run.set_status("complete", labels={str(a): int(b) for a, b in counts.items()})
    return GateRun("chg", res.table, summary, curves, run, validation, figures)


def _execute_contrast(job: _Job, forget: Any, config: Any) -> GateRun:
    from headlab.analyses.gates_contrast import contrast_table, contrastive_chg
    from headlab.analyses.gates_plots import gate_heatmap, label_map, loss_curves
    from headlab.analyses.gates_validate import ablate_groups, label_groups

    run, prepared = job.run, job.prepared
    theta = load_tensor(run, "theta-contrast.safetensors")
    if run.verified("summary.csv") is None or "curve-contrast" not in run.done_parts():
        theta = None  # the fit's summary or loss curve was lost: fit again
    if theta is None:
        bar = progress_bar(job.progress, config.steps, "contrastive fit")

        def on_step(step: int, values: dict[str, float]) -> None:
            if bar is not None:
                bar.set_postfix(loss=f"{values['loss']:.3f}", refresh=False)
                bar.update(1)

        try:
            res = contrastive_chg(
                prepared.model,
                prepared.eval,
                forget,
                config,
                layout=prepared.layout,
                on_step=on_step,
            )
        finally:
            if bar is not None:
                bar.close()
        run.save_part("curve-contrast", res.curves)
        run.save_table("summary.csv", res.summary)
        save_tensor(run, "theta-contrast.safetensors", res.theta)
        table, summary = res.table, res.summary
    else:
        job.say("resuming: the contrastive fit is already done")
        table = contrast_table(torch.sigmoid(theta), config.threshold)
        summary = pd.read_csv(run.file("summary.csv"))
    curves = run.load_parts()
    for name in ("heads.parquet", "heads.csv"):
        run.save_table(name, table)
    figures = {
        "gate_contrast.png": gate_heatmap(table, "g", title="contrastive gates (low: forget)"),
        "roles.png": label_map(table, "role", title="contrastive CHG roles"),
        "loss_curves.png": loss_curves(curves, "mask"),
    }
    validation = None
    if job.validate:
        groups = label_groups(
            table,
            k=job.k,
            n_random=job.n_random,
            seed=prepared.inputs.seed,
            top="forget_score",
            bottom=None,
        )
        parts = []
        sets = (
            ("retain", prepared.eval, job.metric or prepared.metrics[0]),
            ("forget", forget, None),
        )
        for name, batch, metric in sets:
            part = ablate_groups(
                prepared.model,
                batch,
                groups,
                metric=metric,
                layout=prepared.layout,
                batch_size=job.batch_size,
            )
            parts.append(part.assign(group=part["group"] + f"@{name}"))
        validation = pd.concat(parts, ignore_index=True)
        run.save_table("validation.csv", validation)
    for name, fig in figures.items():
        run.save_figure(name, fig)
    run.set_status("complete", forget_specific=int((table["role"] == "forget-specific").sum()))
    return GateRun("contrast", table, summary, curves, run, validation, figures)
