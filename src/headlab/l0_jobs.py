"""The ``headlab l0`` job: sweep the L0 penalty weight, resumably, into a run directory.

Each finished weight's ``log_alpha`` is saved as ``log_alpha-<lam>.safetensors`` (its loss curve as
``parts/curve-lam<lam>.parquet``); re-running the same command fits only the missing weights.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd
import torch
from matplotlib.figure import Figure

from headlab.gate_jobs import load_tensor, progress_bar, save_tensor
from headlab.runs import RunDir

__all__ = ["DEFAULT_L0_LAMBDAS", "DEFAULT_L0_STEPS", "L0Run", "run_l0"]

#: CPU-sized defaults of the command
DEFAULT_L0_STEPS = 100
DEFAULT_L0_LAMBDAS = (0.01, 0.1, 0.3, 1.0, 3.0)


@dataclass
class L0Run:
    """What :func:`run_l0` produced: per-weight table, per-head table, curves, run directory."""

    table: pd.DataFrame
    heads: pd.DataFrame
    curves: pd.DataFrame
    run_dir: RunDir
    figures: dict[str, Figure] = field(default_factory=dict, repr=False)


def _name(lam: float) -> str:
    return f"log_alpha-{lam:g}.safetensors"


def run_l0(
    *,
    out: str | os.PathLike[str],
    lams: Sequence[float] = DEFAULT_L0_LAMBDAS,
    steps: int = DEFAULT_L0_STEPS,
    lr: float = 0.3,
    samples: int = 1,
    metric: str | None = None,
    batch_size: int = 8,
    force: bool = False,
    progress: bool = False,
    on_status: Callable[[str], None] | None = None,
    command: list[str] | None = None,
    **data: Any,
) -> L0Run:
    """Fit hard-concrete gates at every penalty weight in ``lams``; mirrors ``headlab l0``.

    ``data`` takes the shared model/data options of :class:`headlab.jobs.Inputs`.
    """
    from headlab.analyses.gates_l0 import L0Config, check_l0_lambdas, l0_sweep
    from headlab.analyses.gates_plots import l0_tradeoff, loss_curves
    from headlab.jobs import Inputs, prepare

    lams = [float(x) for x in lams]
    check_l0_lambdas(lams)
    config = L0Config(
        steps=steps,
        lr=lr,
        n_samples=samples,
        rows_per_forward=max(1, batch_size) * samples,
        seed=data.get("seed", 0),
    )
    prepared = prepare(Inputs(**data), on_status=on_status)
    settings = {k: v for k, v in asdict(config).items() if k != "rows_per_forward"}
    identity = {**prepared.identity(), "config": settings}
    run = RunDir.open(
        out, kind="l0", identity=identity, command=command, force=force, on_status=on_status
    )
    try:
        if not run.file("tokens.safetensors").is_file():
            run.save_tokens(prepared.eval)
        parts = run.done_parts()  # a fit is done when its gates and its loss curve are intact
        done = {
            lam: t
            for lam in lams
            if f"curve-lam{lam:g}" in parts and (t := load_tensor(run, _name(lam))) is not None
        }
        if done and on_status:
            on_status(f"resuming: lam {', '.join(f'{x:g}' for x in done)} already fitted")
        bar = progress_bar(progress, steps * (len(lams) - len(done)), "l0 fits")

        def on_step(lam: float, step: int, values: dict[str, float]) -> None:
            if bar is not None:
                bar.set_postfix(lam=f"{lam:g}", nll=f"{values['nll']:.3f}", refresh=False)
                bar.update(1)

        def on_fit(lam: float, log_alpha: torch.Tensor, curve: pd.DataFrame) -> None:
            run.save_part(f"curve-lam{lam:g}", curve)
            save_tensor(run, _name(lam), log_alpha)

        try:
            res = l0_sweep(
                prepared.model,
                prepared.eval,
                lams,
                config,
                metric=metric or prepared.metrics[0],
                layout=prepared.layout,
                done=done,
                on_fit=on_fit,
                on_step=on_step,
                heldout=prepared.stats_batch,
            )
        finally:
            if bar is not None:
                bar.close()
        curves = run.load_parts()
        run.save_table("tradeoff.csv", res.table)
        run.save_table("tradeoff.parquet", res.table)
        run.save_table("heads.parquet", res.heads)
        run.save_table("curves.parquet", curves)
        figures = {
            "tradeoff.png": l0_tradeoff(res.table),
            "loss_curves.png": loss_curves(curves, "lam"),
        }
        for name, fig in figures.items():
            run.save_figure(name, fig)
        run.set_status(
            "complete",
            kept={f"{r.lam:g}": int(r.n_kept) for r in res.table.itertuples()},
        )
        return L0Run(res.table, res.heads, curves, run, figures)
    except KeyboardInterrupt:
        run.set_status("interrupted")
        raise
    finally:
        run.close()
