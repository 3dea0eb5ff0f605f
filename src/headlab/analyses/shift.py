"""Distribution shift caused by an ablation: how far the downstream activations leave home.

For each condition (an ablation method applied to some heads) and each block from the first
ablated layer on, against the clean run on the same tokens:

- ``norm_ratio``: ``E_t ||r_abl|| / E_t ||r_clean||`` for the block's output residual stream
  (mean over tokens of the l2 norm; 1 = unchanged scale; "4-5x shift" means 4-5).
- ``frac_3sigma``: the fraction of residual coordinates (over tokens and ``d_model``) that lie
  more than 3 standard deviations from their clean mean, with mean and sd per coordinate taken
  over the clean run's tokens; ``baseline`` is the same fraction for the clean run itself (about
  0.003 for Gaussian coordinates, more for heavy tails).

and at the output (``at_layer = n_layers``): ``kl`` = KL(P_clean || P_abl) of the next-token
distribution and ``ce`` (value, clean baseline, delta), both from :func:`headlab.engine.run_plans`;
for a bare encoder (no LM head) ``embed_cos``, the cosine distance of the sentence embedding.

The table is tidy: ``method, target, layer, head, n_heads, at_layer, metric, value, baseline,
delta``; ``layer`` is the first ablated layer, ``head`` the ablated head (-1 for several).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass

import pandas as pd
import torch
from torch import nn

from headlab.batch import Batch
from headlab.engine import run_plans
from headlab.errors import ConfigError
from headlab.heads import Head
from headlab.hooks import BlockOutput, blocks_of, capture_blocks, intervene
from headlab.interventions import Intervention, Plan, StatsSource, example_offset
from headlab.interventions import intervention_from_name as _parse
from headlab.models.kinds import is_bare
from headlab.models.layout import Layout, call_model, describe, input_device
from headlab.parts import Context, OnForward, Part

__all__ = ["COLUMNS", "Condition", "ShiftPart", "conditions", "part_key", "shift", "shift_plan"]

COLUMNS = [
    "method",
    "target",
    "layer",
    "head",
    "n_heads",
    "at_layer",
    "metric",
    "value",
    "baseline",
    "delta",
]


@dataclass(frozen=True)
class Condition:
    """One ablation to measure: ``method`` on ``heads``, labelled ``target``."""

    method: str
    target: str
    heads: tuple[Head, ...]
    intervention: Intervention

    @property
    def plan(self) -> Plan:
        return Plan.heads(list(self.heads), self.intervention)


def conditions(
    heads: Sequence[Head],
    methods: Sequence[str] = ("zero", "mean", "peak", "resample"),
    *,
    together: bool = True,
    each: bool = False,
) -> list[Condition]:
    """Every method on all ``heads`` at once (target ``topK``) and/or on each head alone
    (target ``L{layer}.H{head}``)."""
    if not heads:
        raise ConfigError("distribution shift needs at least one head to ablate")
    if not (together or each):
        raise ConfigError("choose together=True and/or each=True")
    hs = [(int(ly), int(h)) for ly, h in heads]
    out = []
    for m in methods:
        iv = _parse(m)
        if together:
            out.append(Condition(m, f"top{len(hs)}", tuple(hs), iv))
        if each:
            out += [Condition(m, f"L{ly}.H{h}", ((ly, h),), iv) for ly, h in hs]
    return out


def part_key(method: str) -> str:
    return f"shift-{method.replace(':', '_')}"


@dataclass(frozen=True)
class ShiftPart(Part):
    """Every condition of one method (key ``shift-METHOD``): the unit a run directory saves."""

    method: str
    conditions: tuple[Condition, ...]
    skip_first: bool = False

    @property
    def key(self) -> str:
        return part_key(self.method)

    def cost(self, ctx: Context) -> int:
        return len(self.conditions) * len(ctx.batch)

    def run(self, ctx: Context, on_forward: OnForward | None = None) -> pd.DataFrame:
        def done(k: int) -> None:
            if on_forward is not None:
                on_forward(len(ctx.batch))

        return shift(
            ctx.model, ctx.batch, self.conditions, stats=ctx.stats, batch_size=ctx.batch_size,
            skip_first=self.skip_first, on_condition=done, layout=ctx.layout,
        )  # fmt: skip


def shift_plan(
    heads: Sequence[Head],
    methods: Sequence[str] = ("zero", "mean", "peak", "resample"),
    *,
    each: bool = False,
    skip_first: bool = False,
) -> list[ShiftPart]:
    """One part per method: the method on all ``heads`` at once and, with ``each``, on each head
    alone (see :func:`conditions`)."""
    parts: dict[str, ShiftPart] = {}
    for m in methods:
        parts.setdefault(
            part_key(m), ShiftPart(m, tuple(conditions(heads, [m], each=each)), skip_first)
        )
    return list(parts.values())


class _Moments:
    """Streaming per-layer sums for the residual stream: norms, and per-coordinate moments."""

    def __init__(self, n_layers: int, d_model: int) -> None:
        self.norm = torch.zeros(n_layers, dtype=torch.float64)
        self.tokens = 0
        self.sum = torch.zeros(n_layers, d_model, dtype=torch.float64)
        self.sq = torch.zeros(n_layers, d_model, dtype=torch.float64)
        self.beyond = torch.zeros(n_layers, dtype=torch.float64)

    def add(self, hidden: list[torch.Tensor], keep: torch.Tensor, ref: tuple | None = None) -> None:
        """``hidden[layer]``: ``[batch, pos, d_model]``; ``keep``: ``[batch, pos]`` bool."""
        self.tokens += int(keep.sum())
        for ly, h in enumerate(hidden):
            x = h[keep.to(h.device)].double().cpu()  # [tokens, d_model]
            self.norm[ly] += x.norm(dim=-1).sum()
            self.sum[ly] += x.sum(0)
            self.sq[ly] += (x * x).sum(0)
            if ref is not None:
                mu, sd = ref
                self.beyond[ly] += ((x - mu[ly]).abs() > 3 * sd[ly]).double().sum()

    def mean_sd(self) -> tuple[torch.Tensor, torch.Tensor]:
        mu = self.sum / self.tokens
        var = (self.sq / self.tokens - mu * mu).clamp_min(0)
        return mu, var.sqrt().clamp_min(1e-12)


def _residuals(
    model: nn.Module,
    batch: Batch,
    blocks: nn.ModuleList,
    plan: Plan,
    stats: StatsSource | None,
    batch_size: int,
    acc: _Moments,
    ref: tuple | None,
    skip_first: bool,
) -> None:
    device = input_device(model)
    for i, chunk in enumerate(batch.chunks(batch_size)):
        got: dict[int, BlockOutput] = {}
        with ExitStack() as stack:
            stack.enter_context(torch.no_grad())
            stack.enter_context(example_offset(i * batch_size))
            stack.enter_context(capture_blocks(blocks, got.__setitem__))
            if len(plan):
                stack.enter_context(intervene(model, plan, stats=stats))
            call_model(model, chunk.to(device).model_inputs())
        if len(got) != len(blocks):
            raise ConfigError(
                f"{type(model).__name__}: could not read every block's output (got {len(got)} "
                f"of {len(blocks)}), so the residual stream cannot be compared"
            )
        keep = torch.ones(len(chunk), chunk.seq_len, dtype=torch.bool)  # [batch, pos]
        if chunk.attention_mask is not None:
            keep &= chunk.attention_mask.bool().cpu()
        if skip_first:
            keep[:, 0] = False
        acc.add([got[ly].hidden for ly in range(len(blocks))], keep, ref)


def shift(
    model: nn.Module,
    batch: Batch,
    conds: Sequence[Condition],
    *,
    stats: StatsSource | None = None,
    batch_size: int = 8,
    skip_first: bool = False,
    on_condition: Callable[[int], None] | None = None,
    layout: Layout | None = None,
) -> pd.DataFrame:
    """Measure every condition (see the module docstring).

    Args:
        conds: from :func:`conditions`.
        skip_first: leave position 0 (often an attention sink with a huge norm) out of the
            residual-stream measures.
        on_condition: called with the number of conditions done (progress).
    """
    layout = layout if layout is not None else describe(model)
    if not conds:
        raise ConfigError("no conditions to measure; build them with conditions(heads, methods)")
    for c in conds:
        c.plan.check(layout.n_layers, layout.n_heads, layout.d_head)
        if c.intervention.needs is not None and stats is None:
            raise ConfigError(f"method {c.method!r} needs activation statistics; pass stats=...")
    if batch.input_ids is None:
        raise ConfigError(
            "distribution shift is measured on text batches (input_ids); it does not apply to a "
            "vision model's pixel_values"
        )
    blocks = blocks_of(model, layout)
    d_model = int(getattr(model.config, "hidden_size", 0) or model.config.n_embd)

    def pass_(plan: Plan, ref: tuple | None) -> _Moments:
        acc = _Moments(layout.n_layers, d_model)
        _residuals(model, batch, blocks, plan, stats, batch_size, acc, ref, skip_first)
        return acc

    clean = pass_(Plan(), None)
    ref = clean.mean_sd()
    clean_beyond = pass_(Plan(), ref).beyond / (clean.tokens * d_model)
    clean_norm = clean.norm / clean.tokens
    ends = ["embed_cos"] if is_bare(model) else ["kl", "ce"]  # a bare encoder has no logits
    outputs = run_plans(
        model, batch, [Plan(), *(c.plan for c in conds)], ends, stats=stats,
        batch_size=batch_size, layout=layout,
    )  # fmt: skip
    base = {m: outputs[0][m].mean for m in ends}  # kl and embed_cos: exactly 0
    rows = []
    for k, (c, out) in enumerate(zip(conds, outputs[1:], strict=True)):
        acc = pass_(c.plan, ref)
        first = min(ly for ly, _ in c.heads)
        head = c.heads[0][1] if len(c.heads) == 1 else -1
        info = [c.method, c.target, first, head, len(c.heads)]
        norm = acc.norm / acc.tokens
        beyond = acc.beyond / (acc.tokens * d_model)
        for ly in range(first, layout.n_layers):
            ratio = float(norm[ly] / clean_norm[ly])
            rows.append([*info, ly, "norm_ratio", ratio, 1.0, ratio - 1.0])
            b, cb = float(beyond[ly]), float(clean_beyond[ly])
            rows.append([*info, ly, "frac_3sigma", b, cb, b - cb])
        for m in ends:
            value = out[m].mean
            rows.append([*info, layout.n_layers, m, value, base[m], value - base[m]])
        if on_condition is not None:
            on_condition(k + 1)
    return pd.DataFrame(rows, columns=COLUMNS)
