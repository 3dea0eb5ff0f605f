"""Hard-concrete L0 head gates (Voita et al. 2019, after Louizos et al. 2018) on a frozen model.

Each head has a trainable ``log_alpha``. During training the gate is a stretched, clipped binary
concrete sample (temperature ``beta``, stretch ``(l, r)``, ``u ~ U(eps, 1 - eps)``)::

    s = sigmoid((log u - log(1 - u) + log_alpha) / beta);  g = min(1, max(0, s * (r - l) + l))

and at evaluation the deterministic gate ``g = clip(sigmoid(log_alpha) * (r - l) + l, 0, 1)``.
The objective is ``NLL + lam * L_C`` with ``L_C = (1 / n_layers) * sum_{layer, head}
clip(sigmoid(log_alpha - beta * log(-l / r)), eps, 1 - eps)`` — the expected number of open gates,
summed per layer and averaged over layers as in ``lena-voita/the-story-of-heads``. Defaults:
``beta = 0.33, l = -0.1, r = 1.1, eps = 1e-6``. Unlike Voita et al., the model stays frozen and
only the gates are trained. A head is *kept* when its deterministic gate is above 0.

Sweeping ``lam`` gives the trade-off between heads kept and the task metric (:func:`l0_sweep`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from torch import nn

from headlab.analyses.gates.core import (
    check_rate,
    frozen,
    gate_metric,
    loss_targets,
    nll_pass,
    optimise,
)
from headlab.batch import Batch
from headlab.engine import run_plans
from headlab.errors import ConfigError, check_count
from headlab.interventions import Gate, Plan, Site, Zero
from headlab.metrics import get_metric
from headlab.models.layout import Layout, describe, input_device
from headlab.parts import Context, OnForward, Part

__all__ = [
    "L0Config",
    "L0FitPart",
    "L0SweepResult",
    "check_l0_lambdas",
    "fit_l0",
    "hard_concrete",
    "hard_concrete_test",
    "l0_evaluate",
    "l0_penalty",
    "l0_sweep",
]

#: beyond this the penalty (up to lam * heads per layer) swamps any task loss
MAX_L0_LAMBDA = 100.0


def check_l0_lambdas(lams: Sequence[float]) -> None:
    """Raise unless ``lams`` is a non-empty list of distinct usable penalty weights."""
    if not lams:
        raise ConfigError("give at least one L0 penalty weight, e.g. --lam 0.01,0.1,1")
    for lam in lams:
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam):
            raise ConfigError(f"L0 penalty weights must be finite numbers, got {lam!r}")
        if lam < 0:
            raise ConfigError(
                f"L0 penalty weight {lam} is negative: it would reward opening gates; the "
                "penalty counts open heads, so use lam >= 0 (0 keeps every head)"
            )
        if lam > MAX_L0_LAMBDA:
            raise ConfigError(
                f"L0 penalty weight {lam} is absurdly large (the task loss is a few nats, the "
                f"penalty up to {lam:g} x heads per layer): every head would be pruned; use "
                f"values in [0, {MAX_L0_LAMBDA:g}], e.g. 0.01,0.1,1"
            )
    if len(set(lams)) != len(lams):
        raise ConfigError(f"L0 penalty weights repeat: {list(lams)}")


@dataclass(frozen=True)
class L0Config:
    """Settings of one L0 fit (Voita et al.'s gate constants; optimiser settings ours).

    Attributes:
        steps: Adam updates per penalty weight.
        lr: Adam learning rate of ``log_alpha`` (0.3 closes an unneeded gate from the
            initial ``log_alpha = 3`` in about 20 updates).
        beta, l, r, eps: hard-concrete temperature, stretch and clipping.
        init_log_alpha: starting ``log_alpha`` (3: every gate open, as in the clean model).
        n_samples: gate samples per update (the batch is repeated once per sample).
        grad_clip: gradient-norm clip (``None``: off).
        rows_per_forward: batch rows (examples x samples) per forward; bounds memory.
        seed: seed of the gate noise.
    """

    steps: int = 200
    lr: float = 0.3
    beta: float = 0.33
    l: float = -0.1
    r: float = 1.1
    eps: float = 1e-6
    init_log_alpha: float = 3.0
    n_samples: int = 1
    grad_clip: float | None = None
    rows_per_forward: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        check_count("steps", self.steps, hint="set --steps")
        check_count("n_samples", self.n_samples, hint="set --samples")
        check_count("rows_per_forward", self.rows_per_forward, hint="set --batch-size")
        check_rate(self.lr, "lr", "--lr")
        check_rate(self.beta, "beta", "--beta")
        if not (self.l < 0 and self.r > 1):
            raise ConfigError(f"the stretch needs l < 0 < 1 < r, got l={self.l}, r={self.r}")
        if not 0 < self.eps < 0.5:
            raise ConfigError(f"eps must be in (0, 0.5), got {self.eps}")


def hard_concrete(log_alpha: torch.Tensor, u: torch.Tensor, config: L0Config) -> torch.Tensor:
    """Training gates from uniform noise ``u`` (same shape as ``log_alpha``, or broadcast)."""
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / config.beta)
    return (s * (config.r - config.l) + config.l).clamp(0.0, 1.0)


def hard_concrete_test(log_alpha: torch.Tensor, config: L0Config) -> torch.Tensor:
    """Deterministic evaluation gates."""
    return (torch.sigmoid(log_alpha) * (config.r - config.l) + config.l).clamp(0.0, 1.0)


def l0_penalty(log_alpha: torch.Tensor, config: L0Config) -> torch.Tensor:
    """``L_C``: probability of each gate being non-zero, summed per layer, averaged over layers.

    ``log_alpha`` is ``[layer, head]``; returns a scalar.
    """
    shift = config.beta * math.log(-config.l / config.r)
    p = torch.sigmoid(log_alpha - shift).clamp(config.eps, 1 - config.eps)  # [layer, head]
    return p.sum(-1).mean()


def fit_l0(
    model: nn.Module,
    batch: Batch,
    lam: float,
    config: L0Config | None = None,
    *,
    layout: Layout | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> tuple[torch.Tensor, pd.DataFrame]:
    """Fit ``log_alpha`` (``[layer, head]``) at penalty weight ``lam``; returns it and the curve."""
    config = config or L0Config()
    check_l0_lambdas([lam])
    layout = layout or describe(model)
    device = input_device(model)
    shape = (layout.n_layers, layout.n_heads)
    log_alpha = torch.full(shape, float(config.init_log_alpha), device=device, requires_grad=True)
    gen = torch.Generator().manual_seed(config.seed)
    data = nll_pass(model, batch, loss_targets(batch), layout, config.rows_per_forward)
    lo, hi = config.eps, 1 - config.eps

    def gates_of() -> torch.Tensor:
        u = torch.rand((config.n_samples, *shape), generator=gen) * (hi - lo) + lo
        return hard_concrete(log_alpha, u.to(device), config)  # [sample, layer, head]

    def penalty() -> torch.Tensor:
        return (lam * l0_penalty(log_alpha, config)).cpu().expand(config.n_samples)

    with frozen(model):
        curve = optimise(
            [log_alpha],
            gates_of,
            penalty,
            data,
            steps=config.steps,
            lr=config.lr,
            grad_clip=config.grad_clip,
            on_step=on_step,
        )
    return log_alpha.detach().cpu(), curve


@dataclass(frozen=True, eq=False)
class L0FitPart(Part):
    """The fit at one penalty weight as a part of a job (key ``curve-lam<lam>``): returns the
    fitted ``log_alpha`` (``[layer, head]``) and the loss curve (with a ``lam`` column).
    ``cost`` counts updates, and ``on_forward`` is called once per update."""

    lam: float
    config: L0Config

    @property
    def key(self) -> str:
        return f"curve-lam{self.lam:g}"

    def cost(self, ctx: Context) -> int:
        return self.config.steps

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
        log_alpha, curve = fit_l0(
            model, batch, self.lam, self.config, layout=layout, on_step=on_step
        )
        curve.insert(0, "lam", float(self.lam))
        return log_alpha, curve


@dataclass
class L0SweepResult:
    """``table``: one row per penalty weight; ``heads``: one row per (weight, head);
    ``log_alphas``: fitted ``[layer, head]`` per weight; ``curves``: loss curves."""

    table: pd.DataFrame
    heads: pd.DataFrame
    log_alphas: dict[float, torch.Tensor]
    curves: pd.DataFrame


def gate_value_plan(gates: torch.Tensor) -> Plan:
    """A plan multiplying every head by ``gates[layer, head]``."""
    heads = tuple(range(gates.shape[1]))
    return Plan(tuple((Site(ly, heads), Gate(gates[ly])) for ly in range(gates.shape[0])))


def l0_sweep(
    model: nn.Module,
    batch: Batch,
    lams: Sequence[float],
    config: L0Config | None = None,
    *,
    metric: str | None = None,
    layout: Layout | None = None,
    done: Mapping[float, torch.Tensor] | None = None,
    on_fit: Callable[[float, torch.Tensor, pd.DataFrame], None] | None = None,
    on_step: Callable[[float, int, dict[str, float]], None] | None = None,
    heldout: Batch | None = None,
) -> L0SweepResult:
    """Fit gates at each penalty weight and measure the metric with the deterministic gates.

    ``table`` columns: ``lam, n_kept, frac_kept, metric, value`` (deterministic gates),
    ``value_binary`` (pruned heads zeroed, kept heads fully on), ``baseline, delta, nll``, and
    with a ``heldout`` batch (not used for fitting) ``value_heldout, baseline_heldout``.
    ``metric`` defaults to ``ce`` for next-token targets and ``answer_logprob`` for answer tasks.
    """
    config = config or L0Config()
    check_l0_lambdas(list(lams))
    layout = layout or describe(model)
    metric = metric or gate_metric(batch)
    get_metric(metric)
    fitted = {float(k): v for k, v in (done or {}).items()}
    curves = []
    for lam in lams:
        if float(lam) in fitted:
            continue
        cb = (lambda s, v, lam=lam: on_step(lam, s, v)) if on_step else None
        log_alpha, curve = L0FitPart(float(lam), config).run_on(model, batch, layout, on_step=cb)
        fitted[float(lam)] = log_alpha
        curves.append(curve)
        if on_fit is not None:
            on_fit(float(lam), log_alpha, curve)
    table, heads = l0_evaluate(
        model, batch, lams, fitted, config, metric=metric, layout=layout, heldout=heldout
    )
    curve_table = pd.concat(curves, ignore_index=True) if curves else pd.DataFrame()
    return L0SweepResult(table, heads, fitted, curve_table)


def l0_evaluate(
    model: nn.Module,
    batch: Batch,
    lams: Sequence[float],
    log_alphas: Mapping[float, torch.Tensor],
    config: L0Config,
    *,
    metric: str,
    layout: Layout,
    heldout: Batch | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The ``table`` and ``heads`` of :func:`l0_sweep` from the fitted ``log_alphas`` (``[layer,
    head]`` per penalty weight, keyed by ``float(lam)``)."""
    plans, head_rows = [Plan()], []
    for lam in lams:
        gates = hard_concrete_test(log_alphas[float(lam)], config)  # [layer, head]
        pruned = [(ly, h) for ly, h in layout.heads() if float(gates[ly, h]) <= 0.0]
        plans += [gate_value_plan(gates), Plan.heads(pruned, Zero()) if pruned else Plan()]
        for ly, h in layout.heads():
            head_rows.append(
                {
                    "lam": float(lam),
                    "layer": ly,
                    "head": h,
                    "log_alpha": float(log_alphas[float(lam)][ly, h]),
                    "gate": float(gates[ly, h]),
                    "kept": bool(gates[ly, h] > 0),
                }
            )
    scores = run_plans(
        model, batch, plans, [metric], layout=layout, batch_size=config.rows_per_forward
    )
    deterministic = [hard_concrete_test(log_alphas[float(x)], config) for x in lams]
    nll = _nll_of(model, batch, deterministic, layout, config)
    baseline = scores[0][metric].mean
    n_heads = layout.n_layers * layout.n_heads
    rows = []
    for i, lam in enumerate(lams):
        kept = sum(r["kept"] for r in head_rows if r["lam"] == float(lam))
        value = scores[1 + 2 * i][metric].mean
        rows.append(
            {
                "lam": float(lam),
                "n_kept": kept,
                "frac_kept": kept / n_heads,
                "metric": metric,
                "value": value,
                "value_binary": scores[2 + 2 * i][metric].mean,
                "baseline": baseline,
                "delta": value - baseline,
                "nll": float(nll[i]),
            }
        )
    table = pd.DataFrame(rows)
    if heldout is not None:
        held = run_plans(
            model,
            heldout,
            plans[:1] + plans[1::2],
            [metric],
            layout=layout,
            batch_size=config.rows_per_forward,
        )  # the clean plan, then each weight's deterministic gates
        table["value_heldout"] = [h[metric].mean for h in held[1:]]
        table["baseline_heldout"] = held[0][metric].mean
    return table, pd.DataFrame(head_rows)


def _nll_of(
    model: nn.Module, batch: Batch, gates: list[torch.Tensor], layout: Layout, config: L0Config
) -> torch.Tensor:
    """The fitted objective's NLL under each deterministic gate set: ``[len(gates)]``."""
    data = nll_pass(model, batch, loss_targets(batch), layout, config.rows_per_forward)
    stacked = torch.stack(gates).to(input_device(model))  # [n, layer, head]
    with frozen(model), torch.no_grad():
        return data(stacked, False)["nll"]
