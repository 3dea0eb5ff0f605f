"""Contrastive Causal Head Gating: heads that one sub-task needs and another does not.

Gates ``G = sigmoid(theta)`` are fitted to keep the model's performance on a *retain* set while
lowering it on a *forget* set. Per mask, with ``NLL_R`` the retain objective (mean over examples
of each example's mean target NLL), ``NLL_F,b`` forget example ``b``'s mean target NLL, ``sg`` a
stop-gradient and ``margin`` (default 5 nats)::

    L(theta) = NLL_R + mean_b max(sg(NLL_R) - NLL_F,b, -margin) - lam * mean clip(theta, -4, 4)

This is the official ``ContrastiveCHGTrainer`` objective (its ``max_diff`` is our ``margin``), with
the retain NLL averaged over the retain set instead of paired example by example (so the two sets
may differ in size). The forget term is **bounded**: each forget example is pushed only until its
NLL exceeds the retain NLL by ``margin``, after which it contributes a constant and no gradient,
so the objective cannot run away by destroying the model. ``lam > 0`` keeps heads by default.
Defaults follow the official trainer: one fit from ``G ~ U(0, 1)``, Adam lr 0.1 decaying linearly
to 0.01, gradient-norm clip 1, ``lam = 0.1``.

A head whose fitted gate is low (< ``threshold``) is *forget-specific*: the forget set needs it and
the retain set does not.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn

from headlab.analyses.gates.chg import check_lambda, chg_penalty, init_theta
from headlab.analyses.gates.core import (
    DataPass,
    Targets,
    _chunks,
    check_rate,
    frozen,
    loss_targets,
    masked_nll,
    nll_pass,
    optimise,
    same_targets,
)
from headlab.batch import Batch
from headlab.errors import ConfigError, check_count
from headlab.models.layout import Layout, describe, input_device
from headlab.parts import Context, OnForward, Part

__all__ = [
    "ContrastConfig",
    "ContrastPart",
    "ContrastResult",
    "check_contrast",
    "contrast_table",
    "contrastive_chg",
    "contrastive_pass",
]


@dataclass(frozen=True)
class ContrastConfig:
    """Settings of a contrastive fit (official defaults except ``steps`` and ``n_masks``)."""

    steps: int = 500
    lam: float = 0.1
    margin: float = 5.0
    n_masks: int = 4
    lr: float = 0.1
    lr_end: float | None = 0.01
    grad_clip: float | None = 1.0
    clip: float = 4.0
    threshold: float = 0.5
    rows_per_forward: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        check_count("steps", self.steps, hint="set --steps")
        check_lambda(self.lam)
        check_rate(self.margin, "margin", "--margin")
        check_count("n_masks", self.n_masks, hint="set --masks")
        check_count("rows_per_forward", self.rows_per_forward, hint="set --batch-size")
        check_rate(self.lr, "lr", "--lr")
        if self.lr_end is not None:
            check_rate(self.lr_end, "lr_end", "--lr-end")
        if self.grad_clip is not None:
            check_rate(self.grad_clip, "grad_clip", "--grad-clip")
        if not 0 < self.threshold < 1:
            raise ConfigError(f"threshold must be in (0, 1), got {self.threshold}")


@dataclass
class ContrastResult:
    """Fitted ``theta`` (``[mask, layer, head]``), loss curve, head table and NLL summary."""

    theta: torch.Tensor
    curves: pd.DataFrame
    table: pd.DataFrame
    summary: pd.DataFrame = field(default_factory=pd.DataFrame)


@dataclass(frozen=True, eq=False)
class ContrastPart(Part):
    """The contrastive fit as a part of a job (key ``curve-contrast``): retain ``ctx.batch``,
    forget ``ctx.batches[forget]``; returns the :class:`ContrastResult`. ``cost`` counts updates,
    and ``on_forward`` is called once per update."""

    config: ContrastConfig
    forget: str = "forget"

    @property
    def key(self) -> str:
        return "curve-contrast"

    def cost(self, ctx: Context) -> int:
        return self.config.steps

    def run(self, ctx: Context, on_forward: OnForward | None = None) -> ContrastResult:
        step = (lambda s, v: on_forward(1)) if on_forward is not None else None
        return contrastive_chg(
            ctx.model, ctx.batch, ctx.batches[self.forget], self.config, layout=ctx.layout,
            on_step=step,
        )  # fmt: skip


def check_contrast(retain: Batch, forget: Batch) -> None:
    """Raise unless both sets have loss targets and differ."""
    loss_targets(retain, "the retain set")
    loss_targets(forget, "the forget set")
    if same_targets(retain, forget):
        raise ConfigError(
            "the retain and forget sets are identical (same tokens, same loss mask): the "
            "objective would ask the model to keep and forget the same predictions; give a "
            "different forget set (e.g. --forget-task names when retaining --task induction, "
            "or another corpus with --forget-data)"
        )


def contrastive_pass(
    model: nn.Module,
    retain: Batch,
    forget: Batch,
    layout: Layout,
    margin: float,
    rows_per_forward: int,
) -> DataPass:
    """The data part of the contrastive objective (see the module docstring)."""
    t_retain = loss_targets(retain, "the retain set")
    t_forget = loss_targets(forget, "the forget set")
    retain_pass = nll_pass(model, retain, t_retain, layout, rows_per_forward)
    n_valid = int((torch.bincount(t_forget.rows, minlength=len(forget)) > 0).sum())

    def run(gates: torch.Tensor, train: bool) -> dict[str, torch.Tensor]:
        nll_r = retain_pass(gates, train)["nll"]  # [mask], detached
        term = torch.zeros(gates.shape[0], dtype=torch.float64)
        nll_f = torch.zeros(gates.shape[0], dtype=torch.float64)
        for s, e in _chunks(len(forget), rows_per_forward, gates.shape[0]):
            tg: Targets = t_forget.chunk(s, e)
            with torch.set_grad_enabled(train):
                nll, valid = masked_nll(model, forget.slice(s, e), tg, gates, layout)
                ref = nll_r.to(nll.device)[:, None]  # [mask, 1]
                hinge = torch.clamp(ref - nll, min=-margin) * valid.to(nll.device)  # [mask, b]
                part = hinge.sum(1) / n_valid  # [mask]
                if train:
                    part.mean().backward()
            term += part.detach().double().cpu()
            nll_f += (nll.detach() * valid.to(nll.device)).sum(1).double().cpu() / n_valid
        return {"nll": nll_r, "forget_nll": nll_f, "loss": nll_r + term}

    return run


def contrastive_chg(
    model: nn.Module,
    retain: Batch,
    forget: Batch,
    config: ContrastConfig | None = None,
    *,
    layout: Layout | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> ContrastResult:
    """Fit gates that keep ``retain`` and forget ``forget``; label forget-specific heads.

    Raises:
        ConfigError: either set's loss mask is empty, or the two sets are identical.
    """
    config = config or ContrastConfig()
    layout = layout or describe(model)
    check_contrast(retain, forget)
    data = contrastive_pass(model, retain, forget, layout, config.margin, config.rows_per_forward)
    device = input_device(model)
    shape = (config.n_masks, layout.n_layers, layout.n_heads)
    theta = init_theta(shape, config.seed).to(device).requires_grad_(True)

    with frozen(model):
        curve = optimise(
            [theta],
            lambda: torch.sigmoid(theta),
            lambda: chg_penalty(theta, config.lam, config.clip),
            data,
            steps=config.steps,
            lr=config.lr,
            lr_end=config.lr_end,
            grad_clip=config.grad_clip,
            on_step=on_step,
        )
        with torch.no_grad():
            gates = torch.sigmoid(theta.detach())
            open_gates = torch.ones(1, layout.n_layers, layout.n_heads, device=device)
            clean, fitted = data(open_gates, False), data(gates, False)
    summary = pd.DataFrame(
        [{"gates": "clean", "mask": 0, **{k: float(v[0]) for k, v in clean.items()}}]
        + [
            {"gates": "contrastive", "mask": m, **{k: float(v[m]) for k, v in fitted.items()}}
            for m in range(config.n_masks)
        ]
    )
    table = contrast_table(gates.cpu(), config.threshold)
    return ContrastResult(theta.detach().cpu(), curve, table, summary)


def contrast_table(gates: torch.Tensor, threshold: float = 0.5) -> pd.DataFrame:
    """Per head: ``layer, head, g, g_sd, forget_score = 1 - g, role`` (``forget-specific`` when
    the mask-averaged gate is below ``threshold``, else ``kept``), ``agreement, n_masks``."""
    g = gates.double().numpy()  # [mask, layer, head]
    n_masks, n_layers, n_heads = g.shape
    layer, head = np.meshgrid(np.arange(n_layers), np.arange(n_heads), indexing="ij")
    mean = g.mean(0)
    low = mean < threshold
    return pd.DataFrame(
        {
            "layer": layer.ravel(),
            "head": head.ravel(),
            "g": mean.ravel(),
            "g_sd": (g.std(0, ddof=1) if n_masks > 1 else np.zeros_like(mean)).ravel(),
            "forget_score": 1 - mean.ravel(),
            "role": np.where(low, "forget-specific", "kept").ravel(),
            "agreement": ((g < threshold) == low[None]).mean(0).ravel(),
            "n_masks": n_masks,
        }
    )
