"""A plan applied to one layer's head outputs: the pure tensor work behind every hook.

:func:`as_heads` views an output projection's input ``[batch, pos, head * d_head]`` as
``[batch, pos, head, d_head]``; :func:`resolve_positions` turns a site's positions into indices at
one sequence length; :func:`apply_entries` returns a layer's head outputs with its plan entries
applied; :func:`check_plan` refuses a plan that does not fit a model or lacks its statistics.
No hooks are registered here (that is :mod:`headlab.hooks`).
"""

from __future__ import annotations

import torch
from torch import nn

from headlab.errors import ConfigError, HeadlabError
from headlab.interventions.base import Intervention, Selection, StatsSource
from headlab.interventions.plan import Plan, Site
from headlab.models.layout import Layout

__all__ = ["apply_entries", "as_heads", "check_plan", "resolve_positions"]


def as_heads(x: torch.Tensor, layout: Layout, layer: int) -> torch.Tensor:
    """``x``, the input of layer ``layer``'s output projection, viewed as its heads' outputs."""
    if x.ndim != 3 or x.shape[-1] != layout.n_units:
        raise HeadlabError(
            f"layer {layer}: the output projection received shape {tuple(x.shape)}, expected "
            f"[batch, pos, {layout.n_units}] ({layout.n_heads} heads x {layout.d_head}); the "
            f"family entry {layout.family.name!r} may point at the wrong module"
        )
    return x.view(
        x.shape[0], x.shape[1], layout.n_heads, layout.d_head
    )  # [batch, pos, head, d_head]


def resolve_positions(positions: tuple[int, ...] | None, seq: int, layer: int) -> torch.Tensor:
    """A site's positions (``None``: all; negative from the end) as indices ``[pos]``."""
    if positions is None:
        return torch.arange(seq)
    out = []
    for p in positions:
        q = p + seq if p < 0 else p
        if not 0 <= q < seq:
            raise ConfigError(
                f"position {p} (layer {layer}) is beyond the sequence of length {seq}; "
                f"use positions in 0..{seq - 1} (or -{seq}..-1 from the end)"
            )
        out.append(q)
    if len(set(out)) != len(out):
        raise ConfigError(f"positions {positions} name the same token twice at length {seq}")
    return torch.tensor(out)


def apply_entries(
    z: torch.Tensor,
    entries: list[tuple[Site, Intervention]],
    layer: int,
    layout: Layout,
    stats: StatsSource | None,
) -> torch.Tensor:
    """``z`` ([batch, pos, head, d_head]) with one layer's plan entries applied (a new tensor)."""
    all_neurons = torch.arange(layout.d_head)
    out = z.clone()
    claimed = torch.zeros(z.shape[1:], dtype=torch.bool)  # [pos, head, d_head]
    for site, iv in entries:
        sel = Selection(
            layer=layer,
            heads=torch.tensor(site.heads),
            neurons=torch.tensor(site.neurons) if site.neurons is not None else all_neurons,
            positions=resolve_positions(site.positions, z.shape[1], layer),
        )
        idx = sel.index()
        if claimed[idx[1:]].any():
            raise ConfigError(
                f"two interventions claim the same activations of layer {layer} "
                f"(positions resolved at sequence length {z.shape[1]})"
            )
        claimed[idx[1:]] = True
        dev_idx = (idx[0], *(i.to(z.device) for i in idx[1:]))
        new = iv.apply(z[dev_idx], sel, stats)  # [batch, pos, head, neuron]
        if new.shape != out[dev_idx].shape:
            raise HeadlabError(
                f"{type(iv).__name__} returned shape {tuple(new.shape)}, expected "
                f"{tuple(out[dev_idx].shape)}"
            )
        out[dev_idx] = new
    return out


def check_plan(
    plan: Plan,
    layout: Layout,
    stats: StatsSource | None,
    what: str = "intervene()",
    model: nn.Module | None = None,
) -> None:
    """Raise a clear error if ``plan`` does not fit ``layout`` or lacks its statistics."""
    if not isinstance(plan, Plan):
        raise ConfigError(f"{what} takes a headlab.Plan, got {type(plan).__name__}")
    plan.check(layout.n_layers, layout.n_heads, layout.d_head)
    needs = plan.needs()
    if needs and stats is None:
        raise ConfigError(
            f"this plan needs activation statistics ({', '.join(sorted(needs))}); collect them "
            f"with headlab.collect_stats(model, batch) and pass stats=... to {what}"
        )
    check = getattr(stats, "check_layout", None)
    if needs and check is not None:
        check(layout)
    # statistics that record the weights they came from must come from this model (the model's
    # fingerprint is cached on it, so this costs nothing after the first intervention)
    check = getattr(stats, "check_fingerprint", None)
    if needs and check is not None and model is not None:
        check(model)
