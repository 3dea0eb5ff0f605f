"""Block outputs recorded on a clean run and replayed in place of the early blocks.

:func:`capture_blocks` records every block's output as a :class:`BlockOutput`;
:func:`replay_blocks` later stands in for the early blocks (their ``forward`` temporarily returns
the recorded output), so nothing before the first intervened layer is recomputed. The list of
blocks comes from :func:`headlab.models.layout.blocks_of`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["BlockOutput", "capture_blocks", "replay_blocks"]


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
    for). Each block's ``forward`` is restored on exit, also when the body raises: on a model
    dispatched by accelerate that is accelerate's wrapper (it moves inputs to the block's device
    and reads offloaded weights in), which a replayed block has no need for — its recorded output
    stays where the block ran, and the next block's wrapper moves it on.
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
