"""Attention probabilities, read from Hugging Face's own forward.

A pattern is ``A[layer, batch, head, q, k]``: ``q`` the position that attends, ``k`` the position
attended to; rows sum to 1. It comes from ``output_attentions=True`` with the model's attention
implementation switched to ``eager`` for the duration (:func:`eager_attention`; SDPA and flash
kernels do not return probabilities) and restored afterwards. Grouped-query models report one
pattern per *query* head.

:func:`attention_patterns` reads every layer's patterns sub-batch by sub-batch; its ``around``
argument runs each forward inside a context (``headlab.hooks.intervene_at`` applies an
intervention plan there, e.g. to see an induction head fail once its previous-token head is
ablated).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from torch import nn

from headlab.batch import Batch
from headlab.errors import ConfigError, HeadlabError
from headlab.models.layout import call_model, input_device

__all__ = ["attention_patterns", "check_unpadded", "eager_attention", "forward_attentions"]

#: a context entered around the forward of each sub-batch, given the index of its first example
Around = Callable[[int], AbstractContextManager[Any]]


@contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Switch ``model`` to eager attention (which returns probabilities) and restore it after.

    Uses ``model.set_attn_implementation`` (transformers >= 4.48); raises a clear error for models
    without it.
    """
    config = getattr(model, "config", None)
    old = getattr(config, "_attn_implementation", None)
    setter = getattr(model, "set_attn_implementation", None)
    if old == "eager":
        yield
        return
    if setter is None or old is None:
        raise HeadlabError(
            f"{type(model).__name__} cannot switch to eager attention (no "
            "set_attn_implementation); load it with attn_implementation='eager' to read patterns"
        )
    setter("eager")
    try:
        yield
    finally:
        setter(old)


def forward_attentions(model: nn.Module, inputs: dict[str, torch.Tensor]) -> tuple:
    """One forward with ``output_attentions=True`` (inside :func:`eager_attention`): every
    layer's ``[batch, head, q, k]`` probabilities, refused loudly if the model reports none."""
    out = call_model(model, inputs, output_attentions=True)
    attn = getattr(out, "attentions", None)
    if not attn or any(a is None for a in attn):
        raise HeadlabError(
            f"{type(model).__name__} returned no attention probabilities with "
            "output_attentions=True; its attention implementation cannot report them"
        )
    return tuple(attn)


def check_unpadded(batch: Batch) -> None:
    """Refuse a batch without token ids or with padding (patterns are compared position by
    position, so every sequence must have the same length)."""
    if batch.input_ids is None:
        raise ConfigError("head detectors read token ids; give a text batch (input_ids)")
    am = batch.attention_mask
    if am is not None and not bool(am.bool().all()):
        raise ConfigError(
            "head detectors need unpadded sequences of one length; use blocks from "
            "headlab.make_blocks or a task batch"
        )


def attention_patterns(
    model: nn.Module,
    batch: Batch,
    *,
    batch_size: int = 8,
    around: Around | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(start, A)`` per sub-batch: ``A`` is ``[layer, batch, head, q, k]`` (float32, CPU)
    for examples ``start : start + batch`` of ``batch``; each forward runs inside
    ``around(start)`` when given.

    The model runs with eager attention until the generator is exhausted or closed (use it in a
    ``for`` loop, or ``contextlib.closing``)."""
    check_unpadded(batch)
    device = input_device(model)
    with torch.no_grad(), eager_attention(model):
        for i, chunk in enumerate(batch.chunks(batch_size)):
            start = i * batch_size
            with around(start) if around is not None else nullcontext():
                attn = forward_attentions(model, chunk.to(device).model_inputs())
            yield start, torch.stack([a.float().cpu() for a in attn])  # [layer, batch, head, q, k]
