"""Head outputs read and added to.

:func:`capture` streams every (or the chosen) layer's head outputs ``[batch, pos, head, d_head]``
to a callback; :func:`record` keeps those of one forward as :class:`~headlab.Activations`;
:func:`add_to_heads` adds tensors to head outputs (the gradient taps of attribution patching).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from headlab.hooks.plans import HookReport, intervene
from headlab.interventions import Activations, Plan, StatsSource
from headlab.interventions.apply import as_heads
from headlab.models.layout import Layout, describe, with_position_ids

__all__ = ["add_to_heads", "capture", "record"]


@contextmanager
def capture(
    model: nn.Module,
    on_activation: Callable[[int, torch.Tensor], None],
    *,
    layers: list[int] | None = None,
    layout: Layout | None = None,
    detach: bool = True,
) -> Iterator[Layout]:
    """Call ``on_activation(layer, z)`` with every chosen layer's head outputs.

    ``z`` is ``[batch, pos, head, d_head]``, as the output projection receives it.
    """
    layout = layout if layout is not None else describe(model)
    chosen = list(range(layout.n_layers)) if layers is None else list(layers)
    for ly in chosen:
        layout.check_head(ly, 0)
    handles = []

    def make(layer: int) -> Callable[[nn.Module, tuple], None]:
        def hook(module: nn.Module, args: tuple) -> None:
            z = as_heads(args[0], layout, layer)
            on_activation(layer, z.detach() if detach else z)

        return hook

    try:
        for ly in chosen:
            handles.append(layout.out_projs[ly].register_forward_pre_hook(make(ly)))
        yield layout
    finally:
        for h in handles:
            h.remove()


def record(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    *,
    layers: list[int] | None = None,
    plan: Plan | None = None,
    stats: StatsSource | None = None,
) -> Activations:
    """Run ``model(**inputs)`` once and return every (or the chosen) layer's head outputs.

    With ``plan``, the activations are those of the intervened run (each layer's input as the
    output projection sees it before that layer's own intervention). A left-padded ``inputs``
    gets its position ids (:func:`headlab.models.layout.with_position_ids`), so the activations
    of every row equal those of the same example unpadded.
    """
    layout = describe(model)
    inputs = with_position_ids(model, inputs)
    got: dict[int, torch.Tensor] = {}

    def keep(layer: int, z: torch.Tensor) -> None:
        got[layer] = z.clone()

    with torch.no_grad(), capture(model, keep, layers=layers, layout=layout):
        if plan is not None and len(plan):
            with intervene(model, plan, stats=stats, layout=layout):
                model(**inputs)
        else:
            model(**inputs)
    return Activations(got)


@contextmanager
def add_to_heads(
    model: nn.Module, deltas: Mapping[int, torch.Tensor], *, layout: Layout | None = None
) -> Iterator[HookReport]:
    """Add ``deltas[layer]`` (``[batch, pos, head, d_head]``) to that layer's head outputs.

    With zero deltas that require grad, ``delta.grad`` after a backward is ``dM/dz`` for every
    head at once — the gradient taps of attribution patching.
    """
    layout = layout if layout is not None else describe(model)
    report = HookReport()

    def make(layer: int) -> Callable[[nn.Module, tuple], tuple]:
        def hook(module: nn.Module, args: tuple) -> tuple:
            x = args[0]
            z = as_heads(x, layout, layer)  # [batch, pos, head, d_head]
            report.calls[layer] = report.calls.get(layer, 0) + 1
            delta = deltas[layer].to(device=z.device, dtype=z.dtype)  # where this layer runs
            return ((z + delta).view(x.shape), *args[1:])

        return hook

    handles = []
    try:
        for layer in sorted(deltas):
            layout.check_head(layer, 0)
            handles.append(layout.out_projs[layer].register_forward_pre_hook(make(layer)))
        yield report
    finally:
        for h in handles:
            h.remove()
