"""The only module that touches PyTorch hooks.

:func:`intervene` installs a :class:`~headlab.Plan` as forward pre-hooks on the attention output
projections, so the *input* of each projection — the heads' outputs ``[batch, pos, head, d_head]``
— is edited before the heads are mixed. Hooks are always removed (also when the body raises), and
leaving the context raises if a planned hook never fired. :func:`capture` streams every layer's
head outputs to a callback; :func:`record` keeps them as :class:`~headlab.Activations`.

For the engine and the estimates: :func:`intervene_stacked` applies plan ``k`` to batch slice
``k`` of one forward; :func:`capture_blocks` / :func:`replay_blocks` record every block's output on
a clean run and later stand in for the early blocks (their ``forward`` temporarily returns the
recorded output, so nothing before the first intervened layer is recomputed);
:func:`tap_output_head` reads the final hidden state at the output head and can hand the head only
the positions a metric needs; :func:`add_to_heads` adds (gradient-tap) tensors to head outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from headlab.errors import ConfigError, HeadlabError
from headlab.interventions import (
    Activations,
    Intervention,
    Plan,
    Selection,
    Site,
    StatsSource,
    example_offset,
)
from headlab.models.layout import Layout, describe, with_position_ids

__all__ = [
    "BlockOutput",
    "HeadTap",
    "HookReport",
    "add_to_heads",
    "blocks_of",
    "capture",
    "capture_blocks",
    "intervene",
    "intervene_at",
    "intervene_stacked",
    "record",
    "replay_blocks",
    "tap_output_head",
]


@dataclass
class HookReport:
    """What happened inside an :func:`intervene` block: hook calls per layer."""

    calls: dict[int, int] = field(default_factory=dict)


def _as_heads(x: torch.Tensor, layout: Layout, layer: int) -> torch.Tensor:
    if x.ndim != 3 or x.shape[-1] != layout.n_units:
        raise HeadlabError(
            f"layer {layer}: the output projection received shape {tuple(x.shape)}, expected "
            f"[batch, pos, {layout.n_units}] ({layout.n_heads} heads x {layout.d_head}); the "
            f"family entry {layout.family.name!r} may point at the wrong module"
        )
    return x.view(
        x.shape[0], x.shape[1], layout.n_heads, layout.d_head
    )  # [batch, pos, head, d_head]


def _resolve_positions(positions: tuple[int, ...] | None, seq: int, layer: int) -> torch.Tensor:
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


def _apply_entries(
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
            positions=_resolve_positions(site.positions, z.shape[1], layer),
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


def _make_hook(
    plan: Plan, layer: int, layout: Layout, stats: StatsSource | None, report: HookReport
) -> Callable[[nn.Module, tuple], tuple]:
    entries = plan.for_layer(layer)

    def hook(module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        out = _apply_entries(_as_heads(x, layout, layer), entries, layer, layout, stats)
        report.calls[layer] = report.calls.get(layer, 0) + 1
        return (out.view(x.shape), *args[1:])

    return hook


def _check_plan(
    plan: Plan,
    layout: Layout,
    stats: StatsSource | None,
    what: str = "intervene()",
    model: nn.Module | None = None,
) -> None:
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


@contextmanager
def intervene(
    model: nn.Module,
    plan: Plan,
    *,
    stats: StatsSource | None = None,
    layout: Layout | None = None,
    check_fired: bool = True,
) -> Iterator[HookReport]:
    """Run the body with ``plan`` installed on ``model``; always restore the model.

    Args:
        model: a Hugging Face model of a registered family.
        plan: what to do to which heads.
        stats: activation statistics, required by Mean, Median, Peak and Resample.
        layout: the model's layout (computed if omitted).
        check_fired: raise on exit if a planned layer's hook never ran.

    Example::

        with headlab.intervene(model, headlab.Plan.of({(3, 5): headlab.Zero()})):
            logits = model(input_ids).logits
    """
    layout = layout if layout is not None else describe(model)
    _check_plan(plan, layout, stats, model=model)
    report = HookReport()
    handles = []
    try:
        for layer in plan.layers:
            hook = _make_hook(plan, layer, layout, stats, report)
            handles.append(layout.out_projs[layer].register_forward_pre_hook(hook))
        yield report
    finally:
        for h in handles:
            h.remove()
    if check_fired:
        missing = [ly for ly in plan.layers if report.calls.get(ly, 0) == 0]
        if missing:
            raise HeadlabError(
                f"planned interventions on layers {missing} never ran: run the model inside the "
                "`with intervene(...)` block (a hook that never fires means nothing was ablated)"
            )


@contextmanager
def intervene_at(
    model: nn.Module, plan: Plan | None, start: int, *, stats: StatsSource | None = None
) -> Iterator[None]:
    """:func:`intervene` for a sub-batch whose first example is example ``start`` of a larger
    batch (input-dependent interventions then pick the same donors as one forward would); an
    empty or missing plan installs nothing. The ``around`` of
    :func:`headlab.models.attention.attention_patterns`: ``partial(intervene_at, model, plan,
    stats=stats)``."""
    with example_offset(start):
        if plan is None or not len(plan):
            yield
            return
        with intervene(model, plan, stats=stats):
            yield


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
            z = _as_heads(args[0], layout, layer)
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


# --- engine support: several plans in one forward, prefix replay, output-head tap ------------


@contextmanager
def intervene_stacked(
    model: nn.Module,
    plans: Sequence[Plan],
    rows: int,
    *,
    stats: StatsSource | None = None,
    layout: Layout | None = None,
    check_fired: bool = True,
) -> Iterator[HookReport]:
    """Like :func:`intervene` for a forward over ``len(plans)`` stacked copies of one sub-batch:
    plan ``k`` acts on batch rows ``k * rows : (k + 1) * rows`` only (the engine's plan batching).

    Each slice is edited exactly as :func:`intervene` would edit a forward of ``rows`` examples
    (resample donors and patch sources are indexed within the slice).
    """
    layout = layout if layout is not None else describe(model)
    for plan in plans:
        _check_plan(plan, layout, stats, "intervene_stacked()", model=model)
    layers = sorted({ly for plan in plans for ly in plan.layers})
    report = HookReport()

    def make(layer: int) -> Callable[[nn.Module, tuple], tuple]:
        per_plan = [(k, plan.for_layer(layer)) for k, plan in enumerate(plans)]
        per_plan = [(k, e) for k, e in per_plan if e]

        def hook(module: nn.Module, args: tuple) -> tuple:
            x = args[0]
            z = _as_heads(x, layout, layer)  # [k * rows, pos, head, d_head]
            if z.shape[0] != rows * len(plans):
                raise HeadlabError(
                    f"intervene_stacked: layer {layer} saw {z.shape[0]} rows, expected "
                    f"{len(plans)} plans x {rows} rows"
                )
            out = z.clone()
            for k, entries in per_plan:
                part = slice(k * rows, (k + 1) * rows)
                out[part] = _apply_entries(z[part], entries, layer, layout, stats)
            report.calls[layer] = report.calls.get(layer, 0) + 1
            return (out.view(x.shape), *args[1:])

        return hook

    handles = []
    try:
        for layer in layers:
            handles.append(layout.out_projs[layer].register_forward_pre_hook(make(layer)))
        yield report
    finally:
        for h in handles:
            h.remove()
    if check_fired:
        missing = [ly for ly in layers if report.calls.get(ly, 0) == 0]
        if missing:
            raise HeadlabError(f"planned interventions on layers {missing} never ran")


def blocks_of(model: nn.Module, layout: Layout) -> nn.ModuleList:
    """The list of blocks (decoder / encoder layers) whose ``i``-th entry holds layer ``i``'s
    output projection."""
    for _, mod in model.named_modules():
        if (
            isinstance(mod, nn.ModuleList)
            and len(mod) == layout.n_layers
            and all(
                any(sub is proj for sub in block.modules())
                for block, proj in zip(mod, layout.out_projs, strict=True)
            )
        ):
            return mod
    raise HeadlabError(
        f"no list of blocks in {type(model).__name__} holds the output projections "
        f"{layout.out_proj_names[0]}..., so layers cannot be replayed; run without prefix reuse"
    )


@dataclass(frozen=True, eq=False)
class BlockOutput:
    """What one block returned on the clean run: its hidden state ``[batch, pos, d_model]`` and,
    for blocks that return tuples, how many further elements the tuple had (``None``: a tensor).
    """

    hidden: torch.Tensor
    n_extra: int | None


@contextmanager
def capture_blocks(
    blocks: Sequence[nn.Module], on_output: Callable[[int, BlockOutput], None]
) -> Iterator[None]:
    """Call ``on_output(i, BlockOutput)`` with every block's output (detached).

    A block that returns neither a tensor nor a tuple starting with one is not reported (such a
    block cannot be replayed; the engine then runs every layer).
    """

    def make(i: int) -> Callable[[nn.Module, tuple, object], None]:
        def hook(module: nn.Module, args: tuple, out: object) -> None:
            if isinstance(out, torch.Tensor):
                on_output(i, BlockOutput(out.detach(), None))
            elif isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor):
                on_output(i, BlockOutput(out[0].detach(), len(out) - 1))

        return hook

    handles = []
    try:
        for i, block in enumerate(blocks):
            handles.append(block.register_forward_hook(make(i)))
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def replay_blocks(
    blocks: Sequence[nn.Module], outputs: Sequence[BlockOutput], *, repeat: int = 1
) -> Iterator[None]:
    """Skip ``blocks[i]`` for ``i < len(outputs)``: each returns its recorded clean output
    (repeated ``repeat`` times along the batch) instead of computing it.

    The model's own forward still runs everything around the blocks (embeddings, masks,
    positions) and every later block. A tuple-returning block gets its hidden state followed by
    ``None`` for the other elements (attention weights and caches, which the engine never asks
    for). Each block's ``forward`` is restored on exit, also when the body raises.
    """
    saved: list[tuple[nn.Module, object]] = []
    missing = object()

    def make(out: BlockOutput) -> Callable[..., object]:
        hidden = out.hidden if repeat == 1 else out.hidden.repeat(repeat, 1, 1)

        def forward(*args: object, **kwargs: object) -> object:
            fresh = hidden.clone()  # later blocks may edit their input in place
            if out.n_extra is None:
                return fresh
            return (fresh, *([None] * out.n_extra))

        return forward

    try:
        for block, out in zip(blocks, outputs, strict=False):
            saved.append((block, block.__dict__.get("forward", missing)))
            block.forward = make(out)
        yield
    finally:
        for block, original in saved:
            if original is missing:
                del block.forward
            else:
                block.forward = original


@dataclass
class HeadTap:
    """What the model's output head received in the last forward (see :func:`tap_output_head`).

    Attributes:
        hidden: the head's original input, the final hidden state ``[batch, pos, d_model]``.
        received: what the head was actually given (``hidden`` or the selection from it).
        calls: how many times the head ran.
    """

    hidden: torch.Tensor | None = None
    received: torch.Tensor | None = None
    calls: int = 0


@contextmanager
def tap_output_head(
    model: nn.Module, select: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> Iterator[HeadTap]:
    """Record the input of ``model.get_output_embeddings()`` (the final hidden state) and,
    with ``select``, give the head ``select(hidden)`` instead, so the vocabulary projection (and
    whatever the model applies after it) runs only where it is needed.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise HeadlabError(f"{type(model).__name__} has no output embeddings to tap")
    tap = HeadTap()

    def hook(module: nn.Module, args: tuple) -> tuple | None:
        tap.hidden = args[0]
        tap.calls += 1
        if select is None:
            tap.received = args[0]
            return None
        tap.received = select(args[0])
        return (tap.received, *args[1:])

    handle = head.register_forward_pre_hook(hook)
    try:
        yield tap
    finally:
        handle.remove()


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
            z = _as_heads(x, layout, layer)  # [batch, pos, head, d_head]
            report.calls[layer] = report.calls.get(layer, 0) + 1
            return ((z + deltas[layer].to(z.dtype)).view(x.shape), *args[1:])

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
