"""Learned head gates: the machinery shared by Causal Head Gating and L0 pruning.

A *gate* multiplies one head's output (the input of the attention output projection,
``[batch, pos, head, d_head]``) by a scalar. Gate fitting keeps the model frozen and learns only the
gate parameters. Several independent gate sets (``mask``) are fitted at once by stacking ``mask``
copies of the batch along the batch axis, mask-major: rows ``m * b : (m + 1) * b`` run under gate
set ``m`` (:class:`MaskGate`).

The fitted loss is the negative log-likelihood of the batch's *targets* (:func:`loss_targets`):
the next-token targets of ``target_mask``, the ``correct`` token at ``answer_pos`` of answer tasks,
masked-LM labels, or class labels. Logits are computed only where a target is read.

:func:`optimise` is the one training loop (Adam, optional linear learning-rate decay, gradient-norm
clipping, gradient accumulation over sub-batches); Causal Head Gating (:mod:`.chg`, contrastive:
:mod:`.contrast`) and hard-concrete L0 gates (:mod:`.l0`) only supply the gate parametrisation and
the penalty.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from headlab.batch import Batch
from headlab.errors import ConfigError, HeadlabError
from headlab.hooks import intervene, tap_output_head
from headlab.interventions import Intervention, Plan, Selection, Site, StatsSource
from headlab.metrics import next_token_mask
from headlab.models.layout import Layout, call_model, input_device

__all__ = [
    "DataPass",
    "MaskGate",
    "Targets",
    "accumulate_gradient",
    "check_rate",
    "frozen",
    "gate_metric",
    "gate_plan",
    "loss_targets",
    "masked_nll",
    "nll_pass",
    "optimise",
    "same_targets",
]


@dataclass(frozen=True, eq=False)
class MaskGate(Intervention):
    """Multiply each selected head by a gate that differs between stacked copies of a batch.

    ``values`` is ``[mask, head]``; the forward's batch holds ``mask`` copies, mask-major, and
    rows ``m * b : (m + 1) * b`` are multiplied by ``values[m]``. Gradients flow into ``values``.
    """

    values: torch.Tensor

    @property
    def label(self) -> str:
        return "gate"

    def apply(self, x: torch.Tensor, sel: Selection, stats: StatsSource | None) -> torch.Tensor:
        g = self.values.to(device=x.device, dtype=x.dtype)  # [mask, head]
        n_mask = g.shape[0]
        if g.ndim != 2 or g.shape[1] != x.shape[2] or x.shape[0] % n_mask:
            raise HeadlabError(
                f"MaskGate values {tuple(g.shape)} do not fit activations {tuple(x.shape)}: need "
                f"[mask, {x.shape[2]}] with the batch a multiple of the number of masks"
            )
        y = x.reshape(n_mask, x.shape[0] // n_mask, *x.shape[1:])  # [mask, batch, pos, head, n]
        return (y * g[:, None, None, :, None]).reshape(x.shape)


def gate_plan(gates: torch.Tensor) -> Plan:
    """A plan gating every head of every layer: ``gates`` is ``[mask, layer, head]``."""
    n_layers, n_heads = gates.shape[1], gates.shape[2]
    heads = tuple(range(n_heads))
    return Plan(tuple((Site(ly, heads), MaskGate(gates[:, ly])) for ly in range(n_layers)))


@contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Evaluation mode and no parameter gradients inside; both restored on exit."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    training = model.training
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        model.eval()
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(training)


@dataclass(frozen=True, eq=False)
class Targets:
    """Where a batch's loss is read: example ``rows[i]``, logits at ``pos[i]``, token ``tokens[i]``.

    ``kind`` is ``next`` (next-token targets), ``answer`` (one position per example), ``mlm``
    (masked-LM labels at their own positions) or ``class`` (one class label per example; ``pos``
    is unused).
    """

    kind: str
    rows: torch.Tensor  # [n]
    pos: torch.Tensor  # [n]
    tokens: torch.Tensor  # [n]
    n_examples: int

    def chunk(self, start: int, stop: int) -> Targets:
        """The targets of examples ``start:stop``, rows renumbered from 0."""
        keep = (self.rows >= start) & (self.rows < stop)
        return Targets(
            self.kind, self.rows[keep] - start, self.pos[keep], self.tokens[keep], stop - start
        )


def loss_targets(batch: Batch, what: str = "the batch") -> Targets:
    """The tokens whose negative log-likelihood the gates are fitted to.

    Raises:
        ConfigError: the loss mask selects no token.
    """
    n = len(batch)
    if batch.labels is not None and batch.labels.ndim == 1:
        rows = torch.arange(n)
        return Targets("class", rows, torch.zeros(n, dtype=torch.long), batch.labels.long(), n)
    if batch.labels is not None and batch.labels.ndim == 2:
        rows, pos = (batch.labels != -100).nonzero(as_tuple=True)
        if rows.numel():
            return Targets("mlm", rows, pos, batch.labels[rows, pos].long(), n)
    elif batch.input_ids is not None:
        if batch.target_mask is not None or batch.answer_pos is None:
            mask = next_token_mask(batch)  # [batch, pos]: token t is predicted at position t - 1
            rows, t = mask.nonzero(as_tuple=True)
            if rows.numel():
                return Targets("next", rows, t - 1, batch.input_ids[rows, t], n)
        if batch.answer_pos is not None and batch.correct is not None:
            rows = torch.arange(n)
            return Targets("answer", rows, batch.answer_pos.long(), batch.correct.long(), n)
    raise ConfigError(
        f"the loss mask of {what} selects no tokens, so there is nothing to fit the gates to: "
        "mark the tokens to predict in target_mask (e.g. --task induction marks the repeated "
        "half; a corpus scores every token), or use an answer task (answer_pos and correct, "
        "e.g. --task names)"
    )


def masked_nll(
    model: nn.Module, chunk: Batch, targets: Targets, gates: torch.Tensor | None, layout: Layout
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example mean NLL of ``targets`` on ``chunk`` under each gate set.

    Args:
        gates: ``[mask, layer, head]`` gate values (``None``: the clean model, one "mask").

    Returns:
        ``([mask, batch] NLL, [batch] bool: the example has a target)``; examples without targets
        get NLL 0. Differentiable with respect to ``gates``.
    """
    n_mask = 1 if gates is None else gates.shape[0]
    b = len(chunk)
    device = input_device(model)
    inputs = {
        k: v.to(device).repeat(n_mask, *([1] * (v.ndim - 1)))  # [mask * batch, ...]
        for k, v in chunk.model_inputs().items()
    }
    rows = (torch.arange(n_mask)[:, None] * b + targets.rows[None]).reshape(-1).to(device)
    pos = targets.pos.repeat(n_mask).to(device)  # [mask * n]
    with ExitStack() as stack:
        if gates is not None:
            stack.enter_context(intervene(model, gate_plan(gates), layout=layout))
        tap = None
        if targets.kind != "class":
            try:  # the head gets the target positions only: [1, mask * n, d]
                tap = stack.enter_context(
                    tap_output_head(model, lambda h: h[rows.to(h.device), pos.to(h.device)][None])
                )
            except HeadlabError:
                tap = None
        logits = getattr(call_model(model, inputs), "logits", None)
    if logits is None:
        raise ConfigError(f"{type(model).__name__} returns no logits; load it with its LM head")
    if targets.kind == "class":
        picked = logits  # [mask * batch, classes]
    elif tap is not None and tap.calls == 1 and logits.shape[:2] == (1, rows.numel()):
        picked = logits[0]  # [mask * n, vocab]
    else:
        picked = logits[rows, pos]  # [mask * n, vocab]
    logp = F.log_softmax(picked.to(torch.promote_types(picked.dtype, torch.float32)), -1)
    tokens = targets.tokens.to(device)
    if targets.kind == "class":
        nll = -logp.gather(1, tokens.repeat(n_mask)[:, None])[:, 0].view(n_mask, b)
        return nll, torch.ones(b, dtype=torch.bool)
    nll = -logp.gather(1, tokens.repeat(n_mask)[:, None])[:, 0].view(n_mask, -1)  # [mask, n]
    counts = torch.bincount(targets.rows, minlength=b).to(device)  # [batch]
    sums = torch.zeros(n_mask, b, device=device, dtype=nll.dtype)
    sums = sums.index_add(1, targets.rows.to(device), nll)  # [mask, batch]
    return sums / counts.clamp_min(1), (counts > 0).cpu()


def _chunks(n: int, rows_per_forward: int, n_mask: int) -> list[tuple[int, int]]:
    size = max(1, rows_per_forward // n_mask)
    return [(s, min(n, s + size)) for s in range(0, n, size)]


#: one pass over the data at fixed gates ``[mask, layer, head]`` (a leaf whose ``.grad`` the pass
#: fills when training); returns named ``[mask]`` tensors (detached) for the loss curve
DataPass = Callable[[torch.Tensor, bool], dict[str, torch.Tensor]]


def nll_pass(
    model: nn.Module, batch: Batch, targets: Targets, layout: Layout, rows_per_forward: int
) -> DataPass:
    """The plain objective: mean over examples of each example's mean target NLL, per mask.

    When training, the mean over masks is back-propagated into the gates sub-batch by sub-batch
    (gradient accumulation), so memory is bounded by ``rows_per_forward``.
    """
    valid = torch.bincount(targets.rows, minlength=targets.n_examples) > 0
    n_valid = int(valid.sum())

    def run(gates: torch.Tensor, train: bool) -> dict[str, torch.Tensor]:
        total = torch.zeros(gates.shape[0], dtype=torch.float64)
        for s, e in _chunks(len(batch), rows_per_forward, gates.shape[0]):
            with torch.set_grad_enabled(train):
                nll, _ = masked_nll(model, batch.slice(s, e), targets.chunk(s, e), gates, layout)
                part = nll.sum(1) / n_valid  # [mask]
                if train:
                    part.mean().backward()
            total += part.detach().double().cpu()
        return {"nll": total}

    return run


def accumulate_gradient(
    gates_of: Callable[[], torch.Tensor],
    penalty: Callable[[], torch.Tensor],
    data: DataPass,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Add the gradient of ``mean_masks(data loss) + mean_masks(penalty)`` to the parameters.

    The data pass runs at fixed gate values (a leaf), filling the gradient with respect to the
    gates; one backward through ``gates_of`` then chains it into the parameters together with
    the penalty. Returns the data pass's values and the penalty per mask (both detached).
    """
    gates = gates_of()  # [mask, layer, head], graph to params
    leaf = gates.detach().requires_grad_(True)
    values = data(leaf, True)
    pen = penalty()  # [mask]
    if leaf.grad is None:
        raise HeadlabError("the gates received no gradient: no gated layer ran")
    ((gates * leaf.grad).sum() + pen.mean()).backward()
    return values, pen.detach().cpu()


def optimise(
    params: list[torch.Tensor],
    gates_of: Callable[[], torch.Tensor],
    penalty: Callable[[], torch.Tensor],
    data: DataPass,
    *,
    steps: int,
    lr: float,
    lr_end: float | None = None,
    grad_clip: float | None = 1.0,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> pd.DataFrame:
    """Minimise ``data loss(gates_of()) + penalty()`` over ``params`` with Adam.

    ``gates_of`` maps the parameters to ``[mask, layer, head]`` gates (it may sample); the data
    pass fills the gradient with respect to the gates, which is then chained into the parameters
    together with the penalty's gradient. Returns the loss curve, one row per (step, mask):
    ``step, mask, nll, penalty, loss`` plus any other value the data pass reports.
    """
    opt = torch.optim.Adam(params, lr=lr)
    sched = None
    if lr_end is not None:
        sched = torch.optim.lr_scheduler.LinearLR(
            opt, start_factor=1.0, end_factor=lr_end / lr, total_iters=max(1, steps)
        )
    rows: list[dict[str, float]] = []
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        values, pen = accumulate_gradient(gates_of, penalty, data)
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        if sched is not None:
            sched.step()
        loss = values.get("loss", values["nll"]) + pen
        for m in range(pen.shape[0]):
            row = {"step": step, "mask": m, "penalty": float(pen[m]), "loss": float(loss[m])}
            row.update({k: float(v[m]) for k, v in values.items() if k != "loss"})
            rows.append(row)
        if on_step is not None:
            on_step(step, {"loss": float(loss.mean()), "nll": float(values["nll"].mean())})
    return pd.DataFrame(rows)


def check_rate(value: float, name: str, flag: str) -> None:
    """Raise unless ``value`` is a finite positive number."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ConfigError(f"{name} must be a finite positive number, got {value!r}; set {flag}")


def gate_metric(batch: Batch) -> str:
    """The metric that scores what the gates are fitted to (the batch's loss targets): ``ce`` for
    next-token targets, ``answer_logprob`` for answer tasks, ``mlm_ce`` for masked-LM labels,
    ``cls_ce`` for classes."""
    kind = loss_targets(batch).kind
    return {"answer": "answer_logprob", "mlm": "mlm_ce", "class": "cls_ce"}.get(kind, "ce")


def same_targets(a: Batch, b: Batch) -> bool:
    """Whether two batches have the same inputs and the same loss targets."""
    if a.input_ids is None or b.input_ids is None or a.input_ids.shape != b.input_ids.shape:
        return False
    if not torch.equal(a.input_ids, b.input_ids):
        return False
    ta, tb = loss_targets(a), loss_targets(b)
    return ta.kind == tb.kind and all(
        torch.equal(x, y) for x, y in ((ta.rows, tb.rows), (ta.pos, tb.pos), (ta.tokens, tb.tokens))
    )
