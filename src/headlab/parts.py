"""Parts: the units of work a job is made of, as explicit values.

A *part* is a frozen value with a ``key`` (its name in the run directory) and a ``run(context)``
that computes it. Running a part needs only a :class:`Context` — the model, its layout, the run's
batches and statistics — and the part itself, so the same part runs in this process, in another
process, or on another machine, and gives the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from headlab.batch import Batch
from headlab.engine import CleanCache
from headlab.models.layout import Layout
from headlab.stats import Stats

__all__ = ["Context", "Part"]

#: progress callback: called with the number of examples of each forward
OnForward = Callable[[int], None]


@dataclass(frozen=True, eq=False)
class Context:
    """Everything a part may read, and nothing else.

    Attributes:
        model: the model (never modified: interventions live in context managers).
        layout: its attention layout.
        batch: the run's evaluation batch.
        stats: the run's activation statistics (``None`` when no method reads them).
        batch_size: examples per forward.
        batches: other named batches a job's parts read (counterfactuals, off-target targets, a
            forget set ...), by name.
        cache: clean runs shared by the parts run in this process (never sent anywhere).
        tokenizer: the model's tokenizer, for parts that read or write text (generation);
            loaded beside the model wherever the part runs.
        caches: clean runs of the named ``batches``, one cache each (like ``cache``).
    """

    model: nn.Module
    layout: Layout
    batch: Batch
    stats: Stats | None = None
    batch_size: int = 8
    batches: Mapping[str, Batch] = field(default_factory=dict)
    cache: CleanCache = field(default_factory=CleanCache, repr=False)
    tokenizer: Any = field(default=None, repr=False)
    caches: dict[str, CleanCache] = field(default_factory=dict, repr=False)


class Part:
    """Base of every part: a frozen dataclass with a ``key`` that subclasses ``run``.

    ``run`` returns what the job saves under ``key`` (a tidy DataFrame for most parts);
    ``cost`` is the number of examples it will forward, for progress bars.
    """

    key: str

    def cost(self, ctx: Context) -> int:
        return 0

    def run(self, ctx: Context, on_forward: OnForward | None = None) -> Any:
        raise NotImplementedError
