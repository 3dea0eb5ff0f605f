"""Causal Head Gating (Nam et al., NeurIPS 2025) on a frozen model.

Each head ``(layer, head)`` gets a gate ``G = sigmoid(theta)`` on its output (the input of the
attention output projection). With ``NLL`` the mean over examples of each example's mean
negative log-likelihood of its target tokens (see :func:`headlab.analyses.gates.loss_targets`)::

    L(theta) = NLL(G) - lam * mean_{layer, head} clip(theta, -4, 4)

as in the official code (``andrewnam/causal_head_gating``). **Sign:** ``lam > 0`` *rewards* large
gates (pressure to keep heads), ``lam < 0`` rewards small gates (pressure to remove them).

Three fits: ``zero`` (``lam = 0`` from ``G ~ U(0, 1)``), then ``plus`` (``+lam``) and ``minus``
(``-lam``), each started from the ``zero`` fit's ``theta``. ``G+`` and ``G-`` are the gates of the
``plus`` and ``minus`` fits. Several masks are fitted at once (independent initialisations, the
batch repeated once per mask); the loss averages over masks and the gradient norm is clipped over
all masks together, as in the official trainer.

Taxonomy (the paper's definition, threshold ``t`` = 0.5 on the mask-averaged gates):
facilitating ``G+ >= t`` and ``G- >= t`` (kept even under removal pressure); interfering ``G+ < t``
and ``G- < t`` (removed even under keep pressure); irrelevant ``G+ >= t > G-`` (follows the
regulariser); ``unstable`` for the contradictory ``G- >= t > G+``. Continuous scores:
``facilitating = G-``, ``interfering = 1 - G+``, ``irrelevant = G+ - G-``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import nn

from headlab.analyses.gates.core import (
    Targets,
    check_rate,
    frozen,
    loss_targets,
    masked_nll,
    nll_pass,
    optimise,
)
from headlab.analyses.gates.taxonomy import head_taxonomy
from headlab.batch import Batch
from headlab.errors import ConfigError, check_count
from headlab.models.layout import Layout, describe, input_device
from headlab.parts import Context, OnForward, Part

__all__ = [
    "FITS",
    "CHGConfig",
    "CHGFitPart",
    "CHGResult",
    "check_lambda",
    "chg",
    "chg_penalty",
    "fit_theta",
    "gate_nll",
    "head_taxonomy",
    "init_theta",
    "label_fits",
]

#: the three fits, in the order they run
FITS = ("zero", "plus", "minus")
#: beyond this the regulariser (which moves the loss by up to 4 * lam nats) swamps any NLL
MAX_LAMBDA = 10.0


def check_lambda(lam: float, flag: str = "--lam") -> None:
    """Raise unless ``lam`` is a usable regularisation magnitude."""
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam):
        raise ConfigError(f"{flag} must be a finite number, got {lam!r}; the paper uses 0.1")
    if lam <= 0:
        raise ConfigError(
            f"{flag} is a magnitude, got {lam}: the fits use +lam (keep pressure) and -lam "
            f"(removal pressure) themselves; give a positive value such as {flag} 0.1"
        )
    if lam > MAX_LAMBDA:
        raise ConfigError(
            f"{flag} {lam} is far too large: the regulariser can move the loss by {4 * lam:g} "
            f"nats, swamping the task's NLL, so every gate would just follow it; use a value "
            f"in (0, {MAX_LAMBDA:g}], typically 0.1"
        )


@dataclass(frozen=True)
class CHGConfig:
    """Settings of the three fits (paper defaults except ``steps`` and ``n_masks``).

    Attributes:
        steps: Adam updates of the ``lam = 0`` fit (the paper: 500).
        reg_steps: updates of each regularised fit (default: ``steps``).
        lam: regularisation magnitude; ``plus`` uses ``+lam``, ``minus`` ``-lam``.
        n_masks: independent masks fitted in parallel (the batch is repeated once per mask).
        lr: Adam learning rate (the paper: 1.0); ``lr_end``: linear decay target (``None``: off).
        grad_clip: gradient-norm clip (``None``: off).
        clip: the ``theta`` clip inside the regulariser.
        start_clipped: start the regularised fits from ``clip(theta_zero, -clip, clip)``
            **[ours]**: the regulariser's gradient vanishes outside the clip, so a head whose
            ``theta`` drifted past it in the ``lam = 0`` fit (Adam turns tiny gradients into
            full-size steps) would otherwise feel no pressure at all. The gates change by < 0.02.
            ``False`` reproduces the official code.
        threshold: the gate level separating "high" from "low" in the taxonomy.
        rows_per_forward: batch rows (examples x masks) per forward; bounds memory.
        seed: seed of the ``U(0, 1)`` initialisation.
    """

    steps: int = 500
    reg_steps: int | None = None
    lam: float = 0.1
    n_masks: int = 4
    lr: float = 1.0
    lr_end: float | None = None
    grad_clip: float | None = 1.0
    clip: float = 4.0
    start_clipped: bool = True
    threshold: float = 0.5
    rows_per_forward: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        check_count("steps", self.steps, hint="set --steps")
        if self.reg_steps is not None:
            check_count("reg_steps", self.reg_steps, hint="set --reg-steps")
        check_lambda(self.lam)
        check_count("n_masks", self.n_masks, hint="set --masks")
        check_count("rows_per_forward", self.rows_per_forward, hint="set --batch-size")
        check_rate(self.lr, "lr", "--lr")
        if self.lr_end is not None:
            check_rate(self.lr_end, "lr_end", "--lr-end")
        if self.grad_clip is not None:
            check_rate(self.grad_clip, "grad_clip", "--grad-clip")
        check_rate(self.clip, "clip", "--clip")
        if not 0 < self.threshold < 1:
            raise ConfigError(f"threshold must be in (0, 1), got {self.threshold}")

    def lam_of(self, fit: str) -> float:
        return {"zero": 0.0, "plus": self.lam, "minus": -self.lam}[fit]

    def steps_of(self, fit: str) -> int:
        return self.steps if fit == "zero" or self.reg_steps is None else self.reg_steps


@dataclass
class CHGResult:
    """Fitted ``theta`` per fit (``[mask, layer, head]``), loss curves and the head table."""

    thetas: dict[str, torch.Tensor]
    curves: pd.DataFrame
    table: pd.DataFrame
    summary: pd.DataFrame = field(default_factory=pd.DataFrame)


def init_theta(shape: tuple[int, int, int], seed: int) -> torch.Tensor:
    """``logit(G)`` with ``G ~ U(0, 1)`` (kept away from 0 and 1)."""
    g = torch.rand(shape, generator=torch.Generator().manual_seed(seed)).clamp(1e-4, 1 - 1e-4)
    return torch.logit(g)  # [mask, layer, head]


def chg_penalty(theta: torch.Tensor, lam: float, clip: float = 4.0) -> torch.Tensor:
    """``-lam * mean_{layer, head} clip(theta, -clip, clip)`` per mask: ``[mask]``.

    Minimising it raises ``theta`` (opens gates) for ``lam > 0`` and lowers it for ``lam < 0``.
    """
    return -lam * theta.clamp(-clip, clip).mean((1, 2)).cpu()


def fit_theta(
    model: nn.Module,
    batch: Batch,
    theta0: torch.Tensor,
    lam: float,
    steps: int,
    config: CHGConfig,
    *,
    layout: Layout,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> tuple[torch.Tensor, pd.DataFrame]:
    """One CHG fit from ``theta0`` (``[mask, layer, head]``): the fitted ``theta`` and curve."""
    device = input_device(model)
    theta = theta0.detach().clone().to(device).requires_grad_(True)
    data = nll_pass(model, batch, loss_targets(batch), layout, config.rows_per_forward)

    with frozen(model):
        curve = optimise(
            [theta],
            lambda: torch.sigmoid(theta),
            lambda: chg_penalty(theta, lam, config.clip),
            data,
            steps=steps,
            lr=config.lr,
            lr_end=config.lr_end,
            grad_clip=config.grad_clip,
            on_step=on_step,
        )
    return theta.detach().cpu(), curve


@dataclass(frozen=True, eq=False)
class CHGFitPart(Part):
    """One of the three fits as a part of a job (key ``curve-<fit>``): it returns the fitted
    ``theta`` (``[mask, layer, head]``) and the loss curve (with a ``fit`` column).

    ``zero`` is the ``zero`` fit's ``theta``, the start of the ``plus`` and ``minus`` fits (clipped
    when ``config.start_clipped``); ``None`` for the ``zero`` fit itself, which starts from
    ``G ~ U(0, 1)``. ``cost`` counts updates, and ``on_forward`` is called once per update.
    """

    fit: str
    config: CHGConfig
    zero: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.fit not in FITS:
            raise ValueError(f"fit must be one of {FITS}, got {self.fit!r}")
        if (self.fit == "zero") != (self.zero is None):
            raise ValueError("the plus and minus fits (and only they) start from the zero fit")

    @property
    def key(self) -> str:
        return f"curve-{self.fit}"

    def cost(self, ctx: Context) -> int:
        return self.config.steps_of(self.fit)

    def run(
        self, ctx: Context, on_forward: OnForward | None = None
    ) -> tuple[torch.Tensor, pd.DataFrame]:
        step = (lambda s, v: on_forward(1)) if on_forward is not None else None
        return self.run_on(ctx.model, ctx.batch, ctx.layout, on_step=step)

    def run_on(
        self,
        model: nn.Module,
        batch: Batch,
        layout: Layout,
        *,
        on_step: Callable[[int, dict[str, float]], None] | None = None,
    ) -> tuple[torch.Tensor, pd.DataFrame]:
        c = self.config
        if self.zero is None:
            start = init_theta((c.n_masks, layout.n_layers, layout.n_heads), c.seed)
        elif c.start_clipped:
            start = self.zero.clamp(-c.clip, c.clip)
        else:
            start = self.zero
        theta, curve = fit_theta(
            model, batch, start, c.lam_of(self.fit), c.steps_of(self.fit), c, layout=layout,
            on_step=on_step,
        )  # fmt: skip
        curve.insert(0, "fit", self.fit)
        return theta, curve


def chg(
    model: nn.Module,
    batch: Batch,
    config: CHGConfig | None = None,
    *,
    layout: Layout | None = None,
    done: Mapping[str, torch.Tensor] | None = None,
    on_fit: Callable[[str, torch.Tensor, pd.DataFrame], None] | None = None,
    on_step: Callable[[str, int, dict[str, float]], None] | None = None,
) -> CHGResult:
    """Run the three CHG fits on ``batch`` and label every head.

    Args:
        done: already fitted ``theta`` per fit name (resumption); those fits are skipped.
        on_fit: called with ``(fit, theta, curve)`` after each fit (e.g. to save it).
        on_step: called with ``(fit, step, {"loss", "nll"})`` after every update (progress).
    """
    config = config or CHGConfig()
    layout = layout or describe(model)
    loss_targets(batch)  # fail before any work if the loss mask is empty
    thetas = dict(done or {})
    curves = []
    for fit in FITS:
        if fit in thetas:
            continue
        part = CHGFitPart(fit, config, None if fit == "zero" else thetas["zero"])
        step_cb = (lambda s, v, fit=fit: on_step(fit, s, v)) if on_step else None
        theta, curve = part.run_on(model, batch, layout, on_step=step_cb)
        thetas[fit] = theta
        curves.append(curve)
        if on_fit is not None:
            on_fit(fit, theta, curve)
    table, summary = label_fits(model, batch, thetas, config, layout=layout)
    curve_table = pd.concat(curves, ignore_index=True) if curves else pd.DataFrame()
    return CHGResult(thetas, curve_table, table, summary)


def label_fits(
    model: nn.Module,
    batch: Batch,
    thetas: Mapping[str, torch.Tensor],
    config: CHGConfig,
    *,
    layout: Layout,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The head table (:func:`head_taxonomy`) of the three fitted ``theta`` and the NLL of
    ``batch`` under each fit's gates (:func:`gate_nll`, rows in the order of ``thetas``)."""
    gates = {k: torch.sigmoid(v) for k, v in thetas.items()}
    table = head_taxonomy(thetas["zero"], thetas["plus"], thetas["minus"], config.threshold)
    summary = gate_nll(model, batch, gates, layout=layout, rows_per_forward=config.rows_per_forward)
    return table, summary


def gate_nll(
    model: nn.Module,
    batch: Batch,
    gates: Mapping[str, torch.Tensor],
    *,
    layout: Layout | None = None,
    rows_per_forward: int = 32,
) -> pd.DataFrame:
    """The fitted objective's NLL under each gate set, and how many gates are open.

    ``gates`` maps a name to ``[mask, layer, head]`` gate values; a ``clean`` row (no gates) comes
    first. Columns: ``gates, mask, nll, mean_gate, n_open`` (gates >= 0.5).
    """
    layout = layout or describe(model)
    targets = loss_targets(batch)
    data = nll_pass(model, batch, targets, layout, rows_per_forward)
    rows = []
    with frozen(model), torch.no_grad():
        clean = _clean_nll(model, batch, targets, layout, rows_per_forward)
        n_heads = layout.n_layers * layout.n_heads
        rows.append(
            {"gates": "clean", "mask": 0, "nll": clean, "mean_gate": 1.0, "n_open": n_heads}
        )
        for name, g in gates.items():
            nll = data(g.to(input_device(model)), False)["nll"]
            for m in range(g.shape[0]):
                rows.append(
                    {
                        "gates": name,
                        "mask": m,
                        "nll": float(nll[m]),
                        "mean_gate": float(g[m].mean()),
                        "n_open": int((g[m] >= 0.5).sum()),
                    }
                )
    return pd.DataFrame(rows)


def _clean_nll(
    model: nn.Module, batch: Batch, targets: Targets, layout: Layout, rows_per_forward: int
) -> float:
    total, n = 0.0, 0
    for s in range(0, len(batch), rows_per_forward):
        e = min(len(batch), s + rows_per_forward)
        nll, valid = masked_nll(model, batch.slice(s, e), targets.chunk(s, e), None, layout)
        total += float(nll[0][valid.to(nll.device)].sum())
        n += int(valid.sum())
    return total / n
