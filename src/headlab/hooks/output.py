"""The model's output head tapped: :func:`tap_output_head` reads the final hidden state and can
hand the head only the positions a metric needs (a :class:`HeadTap` holds what it saw).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from headlab.errors import HeadlabError

__all__ = ["HeadTap", "tap_output_head"]


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
