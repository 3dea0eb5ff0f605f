"""Parts: the units of work a job is made of, as explicit values.

A *part* is a frozen value with a ``key`` (its name in the run directory) and a ``run(context)``
that computes it. Running a part needs only a :class:`Context` — the model, its layout, the run's
batches and statistics — and the part itself, so the same part runs in this process, in another
process, or on another machine, and gives the same numbers. A context that may travel names its
model by a :class:`ModelSpec` (how to load it, never the weights): another process loads the model
from the spec and receives the batches and statistics.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from torch import nn

from headlab.batch import Batch
from headlab.defaults import DEFAULT_MODEL
from headlab.engine import CleanCache
from headlab.models.layout import Layout
from headlab.stats import Stats

__all__ = ["Context", "ModelSpec", "Part"]

#: progress callback: called with the number of examples of each forward
OnForward = Callable[[int], None]


@dataclass(frozen=True)
class ModelSpec:
    """How to load a model anywhere: the arguments of :func:`headlab.models.load.load_model`.

    ``model`` is the named default, a local folder or a hub id; a worker on another machine
    loads it from the same name (a folder must exist at the same path there).
    """

    model: str
    dtype: str = "float32"
    device: str = "cpu"
    trust_remote_code: bool = False
    allow_pickle: bool = False
    #: accelerate placement (see :func:`headlab.models.load.load_model`); with a device map,
    #: ``device`` is not used
    device_map: str | dict[str, int | str] | None = None
    max_memory: dict[int | str, int | str] | None = None
    offload_folder: str | None = None

    def portable(self) -> ModelSpec:
        """This spec with a local folder given as an absolute path (so a worker started in
        another directory finds it)."""
        path = Path(self.model).expanduser()
        if self.model == DEFAULT_MODEL or not path.exists():
            return self
        return replace(self, model=str(path.resolve()))

    def load(self, device: str | None = None) -> tuple[nn.Module, Any]:
        """``(model, tokenizer)`` loaded from the spec (on ``device`` instead, if given)."""
        from headlab.models.load import load_model

        if self.device_map is not None:
            return load_model(
                self.model, dtype=self.dtype, device_map=self.device_map,
                max_memory=self.max_memory, offload_folder=self.offload_folder,
                trust_remote_code=self.trust_remote_code, allow_pickle=self.allow_pickle,
            )  # fmt: skip
        return load_model(
            self.model, dtype=self.dtype, device=device or self.device,
            trust_remote_code=self.trust_remote_code, allow_pickle=self.allow_pickle,
        )  # fmt: skip


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
        spec: how to load ``model`` in another process (``None``: the parts of this context run
            only in this process). An executor that runs parts elsewhere sends ``batch``,
            ``stats``, ``batch_size`` and ``batches``, loads the model (and the tokenizer, when
            ``tokenizer`` is set) from the spec there, and starts empty caches.
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
    spec: ModelSpec | None = None


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
