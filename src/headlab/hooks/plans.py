"""Plans installed as hooks on the attention output projections.

:func:`intervene` installs one :class:`~headlab.Plan` as forward pre-hooks, so the *input* of each
projection — the heads' outputs ``[batch, pos, head, d_head]`` — is edited before the heads are
mixed; :func:`intervene_at` does so for a sub-batch of a larger batch; :func:`intervene_stacked`
applies plan ``k`` to batch slice ``k`` of one forward (the engine's plan batching). Hooks are
always removed (also when the body raises), and leaving the context raises if a planned hook never
fired; a :class:`HookReport` counts the calls.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from torch import nn

from headlab.errors import HeadlabError
from headlab.interventions import Plan, StatsSource, example_offset
from headlab.interventions.apply import apply_entries, as_heads, check_plan
from headlab.models.layout import Layout, describe

__all__ = ["HookReport", "intervene", "intervene_at", "intervene_stacked"]


@dataclass
class HookReport:
    """What happened inside an :func:`intervene` block: hook calls per layer."""

    calls: dict[int, int] = field(default_factory=dict)


def _make_hook(
    plan: Plan, layer: int, layout: Layout, stats: StatsSource | None, report: HookReport
) -> Callable[[nn.Module, tuple], tuple]:
    entries = plan.for_layer(layer)

    def hook(module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        out = apply_entries(as_heads(x, layout, layer), entries, layer, layout, stats)
        report.calls[layer] = report.calls.get(layer, 0) + 1
        return (out.view(x.shape), *args[1:])

    return hook


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
    check_plan(plan, layout, stats, model=model)
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
        check_plan(plan, layout, stats, "intervene_stacked()", model=model)
    layers = sorted({ly for plan in plans for ly in plan.layers})
    report = HookReport()

    def make(layer: int) -> Callable[[nn.Module, tuple], tuple]:
        per_plan = [(k, plan.for_layer(layer)) for k, plan in enumerate(plans)]
        per_plan = [(k, e) for k, e in per_plan if e]

        def hook(module: nn.Module, args: tuple) -> tuple:
            x = args[0]
            z = as_heads(x, layout, layer)  # [k * rows, pos, head, d_head]
            if z.shape[0] != rows * len(plans):
                raise HeadlabError(
                    f"intervene_stacked: layer {layer} saw {z.shape[0]} rows, expected "
                    f"{len(plans)} plans x {rows} rows"
                )
            out = z.clone()
            for k, entries in per_plan:
                part = slice(k * rows, (k + 1) * rows)
                out[part] = apply_entries(z[part], entries, layer, layout, stats)
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
