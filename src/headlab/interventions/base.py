"""The interface every intervention implements, and what it may read besides its input.

:class:`Intervention` is the base class: :meth:`Intervention.apply` takes the selected activations
``x: [batch, pos, head, neuron]``, the :class:`Selection` (a site resolved into index tensors) that
picked them, and a :class:`StatsSource` for the interventions that read activation statistics.
Input-dependent interventions (Resample's donors, Patch's source rows) count examples from the
:func:`example_offset` of the batch now running (:func:`current_offset`).
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch

__all__ = ["Intervention", "Selection", "StatsSource", "current_offset", "example_offset"]

_OFFSET: contextvars.ContextVar[int] = contextvars.ContextVar("headlab_example_offset", default=0)


@contextmanager
def example_offset(start: int) -> Iterator[None]:
    """Declare that the batch now running starts at example ``start`` of a larger batch.

    Input-dependent interventions (Resample's donor choice, Patch's source rows) index examples
    globally, so scoring a batch in sub-batches gives the same numbers as one forward.
    """
    token = _OFFSET.set(int(start))
    try:
        yield
    finally:
        _OFFSET.reset(token)


def current_offset() -> int:
    """The example offset set by :func:`example_offset` (0 outside one)."""
    return _OFFSET.get()


@dataclass(frozen=True, eq=False)
class Selection:
    """A site resolved against a model and a sequence: index tensors ready for gathering."""

    layer: int
    heads: torch.Tensor  # [head]
    neurons: torch.Tensor  # [neuron]
    positions: torch.Tensor  # [pos]

    def index(self) -> tuple[slice, torch.Tensor, torch.Tensor, torch.Tensor]:
        """An index into ``[batch, pos, head, d_head]`` giving ``[batch, pos, head, neuron]``."""
        return (
            slice(None),
            self.positions[:, None, None],
            self.heads[None, :, None],
            self.neurons[None, None, :],
        )


class StatsSource(Protocol):
    """What interventions need from activation statistics (see :class:`headlab.Stats`)."""

    def constant(self, kind: str, layer: int, **options: float | str) -> torch.Tensor:
        """Per-neuron constant ``[head, d_head]`` (``kind``: mean, median or peak)."""
        ...

    def reservoir(self, layer: int) -> torch.Tensor:
        """Stored activations of whole inputs, ``[n_inputs, pos, head, d_head]``."""
        ...


class Intervention:
    """Base class: what the selected activations become. Subclasses are frozen dataclasses."""

    #: the statistic this intervention reads, if any
    needs: str | None = None

    #: a short label used in tables (``zero``, ``mean``, ``scale:-1`` ...)
    @property
    def label(self) -> str:
        return type(self).__name__.lower()

    def apply(
        self, x: torch.Tensor, sel: Selection, stats: StatsSource | None
    ) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError
