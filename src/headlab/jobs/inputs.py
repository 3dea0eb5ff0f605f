"""What a job runs on: the model and data options every command shares (:class:`Inputs`), and
:func:`prepare`, which loads the model and builds the evaluation and statistics batches."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from headlab.batch import Batch
from headlab.errors import ConfigError
from headlab.models.dispatch import dispatch_options
from headlab.models.layout import Layout, describe, max_positions
from headlab.models.load import DEFAULT_MODEL, cached_fingerprint, load_model
from headlab.parts import Context, ModelSpec
from headlab.stats import Stats

__all__ = ["Inputs", "Prepared", "off_target_batches", "placement", "prepare"]


def placement(
    device: str,
    device_map: str | Mapping[str, int | str] | None,
    max_memory: Mapping[int | str, int | str] | None,
    offload_folder: str | os.PathLike[str] | None,
) -> dict[str, Any]:
    """``load_model``'s placement keywords from a job's options, checked before any work (the
    device map itself is computed when the model loads): ``device`` alone, or ``device_map`` with
    ``max_memory`` and ``offload_folder``, where ``device`` must be left at its default ``cpu``.

    Raises:
        ConfigError: ``--device`` other than cpu with ``--device-map``; bad dispatch options.
    """
    if device_map is not None and device != "cpu":
        raise ConfigError(
            f"--device {device} and --device-map {device_map} both say where the model goes; "
            "drop --device (--device-map places every module, on the GPUs first; --max-memory "
            "limits each device)"
        )
    dispatch_options(None, device_map, max_memory, offload_folder)
    if device_map is None:
        return {"device": device}
    return {"device_map": device_map, "max_memory": max_memory, "offload_folder": offload_folder}


@dataclass(frozen=True)
class Inputs:
    """Which model and data a job runs on (the shared CLI options).

    ``device_map``, ``max_memory`` and ``offload_folder`` say where the model's modules sit (see
    :func:`headlab.models.load.load_model`); like ``device`` they are not part of a run's identity
    (the numbers are the same), so a run resumes with or without them.
    """

    model: str = DEFAULT_MODEL
    dtype: str = "float32"
    device: str = "cpu"
    data: str | None = "python-docs"
    task: str | None = None
    text_field: str = "text"
    seq_len: int | None = None
    n_blocks: int = 8
    n_stats_blocks: int = 16
    stats_data: str | None = None
    seed: int = 0
    trust_remote_code: bool = False
    allow_pickle: bool = False
    device_map: str | dict[str, int | str] | None = None
    max_memory: dict[int | str, int | str] | None = None
    offload_folder: str | None = None

    def __post_init__(self) -> None:
        if self.task is not None and self.data not in (None, "python-docs"):
            raise ConfigError("give either --data or --task, not both")
        placement(self.device, self.device_map, self.max_memory, self.offload_folder)
        if self.seq_len is not None and self.seq_len < 1:
            raise ConfigError(f"--seq-len must be a positive integer, got {self.seq_len}")
        if self.n_blocks < 1:
            raise ConfigError(f"--n-blocks must be at least 1, got {self.n_blocks}")
        if self.n_stats_blocks < 1:
            raise ConfigError(f"--n-stats-blocks must be at least 1, got {self.n_stats_blocks}")

    @property
    def spec(self) -> ModelSpec:
        """How to load this model anywhere (what a Ray worker loads)."""
        return ModelSpec(
            self.model, self.dtype, self.device, self.trust_remote_code, self.allow_pickle,
            self.device_map, self.max_memory, self.offload_folder,
        )  # fmt: skip


@dataclass
class Prepared:
    """A loaded model with its evaluation and statistics batches."""

    inputs: Inputs
    model: nn.Module
    tokenizer: Any
    layout: Layout
    eval: Batch
    stats_batch: Batch
    metrics: list[str]
    model_fingerprint: str

    def context(
        self,
        stats: Stats | None = None,
        batch_size: int = 8,
        batches: Mapping[str, Batch] | None = None,
        *,
        tokenizer: bool = False,
    ) -> Context:
        """What parts on the evaluation batch read: this model with ``stats``, ``batch_size``
        and the named ``batches`` (and the tokenizer, with ``tokenizer``), naming the model's
        spec so an executor may run the parts in other processes."""
        return Context(
            self.model, self.layout, self.eval, stats, batch_size, dict(batches or {}),
            tokenizer=self.tokenizer if tokenizer else None, spec=self.inputs.spec,
        )  # fmt: skip

    def identity(self) -> dict[str, Any]:
        from headlab.data.blocks import batch_fingerprint

        inputs = asdict(self.inputs)
        # how the weights file may be read does not change the numbers (the fingerprint names the
        # weights); trust_remote_code stays when set: custom code is the forward pass itself (it
        # is left out when off, so run directories of releases without the option still resume)
        del inputs["allow_pickle"]
        # nor does where the modules sit (accelerate's device map: the unsplit model's numbers)
        for option in ("device_map", "max_memory", "offload_folder"):
            del inputs[option]
        if not inputs["trust_remote_code"]:
            del inputs["trust_remote_code"]
        return {
            **inputs,
            "device": None,  # where it ran does not change the numbers' identity
            "model_fingerprint": self.model_fingerprint,
            "eval_fingerprint": batch_fingerprint(self.eval),
            "stats_fingerprint": batch_fingerprint(self.stats_batch),
        }


def prepare(inputs: Inputs, *, on_status: Callable[[str], None] | None = None) -> Prepared:
    """Load the model and build the evaluation and statistics batches."""
    from headlab.data.blocks import make_blocks
    from headlab.data.corpora import load_texts
    from headlab.data.tasks import load_task

    model, tokenizer = load_model(
        inputs.model,
        dtype=inputs.dtype,
        on_status=on_status,
        trust_remote_code=inputs.trust_remote_code,
        allow_pickle=inputs.allow_pickle,
        **placement(inputs.device, inputs.device_map, inputs.max_memory, inputs.offload_folder),
    )
    layout = describe(model)
    if tokenizer is None or not callable(getattr(tokenizer, "encode", None)):
        raise ConfigError(
            f"{inputs.model} has no text tokenizer; the CLI works on text models (use the Python "
            "API with your own Batch of pixel_values for vision models)"
        )
    max_pos = max_positions(model)
    if inputs.task is not None:
        seq = inputs.seq_len if inputs.task == "induction" else None
        task = load_task(inputs.task, tokenizer, n=inputs.n_blocks, seed=inputs.seed, seq_len=seq)
        evaluation, metric = task.eval, task.metric
        # the statistics split has its own size; its examples come from a disjoint seed stream
        stats_batch = load_task(
            inputs.task, tokenizer, n=inputs.n_stats_blocks, seed=inputs.seed, seq_len=seq
        ).stats
        if max_pos is not None and evaluation.seq_len > max_pos:
            raise ConfigError(
                f"task {inputs.task!r} needs {evaluation.seq_len} positions but the model has "
                f"{max_pos}; use a shorter --seq-len"
            )
        if inputs.stats_data is not None:
            texts = load_texts(inputs.stats_data, text_field=inputs.text_field)
            _, stats_batch = make_blocks(
                tokenizer,
                texts,
                seq_len=evaluation.seq_len,
                n_blocks=1,
                n_stats_blocks=inputs.n_stats_blocks,
                seed=inputs.seed,
                max_positions=max_pos,
            )
        metrics = [metric]
    else:
        if inputs.data is None:
            raise ConfigError("give --data NAME_OR_PATH or --task NAME")
        texts = load_texts(inputs.data, text_field=inputs.text_field)
        evaluation, stats_batch = make_blocks(
            tokenizer,
            texts,
            seq_len=inputs.seq_len or 128,
            n_blocks=inputs.n_blocks,
            n_stats_blocks=inputs.n_stats_blocks,
            seed=inputs.seed,
            max_positions=max_pos,
        )
        if inputs.stats_data is not None:
            other = load_texts(inputs.stats_data, text_field=inputs.text_field)
            _, stats_batch = make_blocks(
                tokenizer,
                other,
                seq_len=evaluation.seq_len,
                n_blocks=1,
                n_stats_blocks=inputs.n_stats_blocks,
                seed=inputs.seed + 1,
                max_positions=max_pos,
            )
        metrics = ["ce"]
    return Prepared(
        inputs,
        model,
        tokenizer,
        layout,
        evaluation,
        stats_batch,
        metrics,
        cached_fingerprint(model),  # computed once: statistics and their checks reuse it
    )


def off_target_batches(
    spec: str,
    prepared: Prepared,
    *,
    n: int,
    seq_len: int | None,
    seed: int,
    exclude_task: str | None = None,
    on_status: Callable[[str], None] | None = None,
) -> dict[str, tuple[Batch, str]]:
    """The targets of ``--off-target SPEC`` as ``{name: (batch, metric)}``: ``none``; ``auto``
    (every built-in task but ``exclude_task``, plus python-docs; a target that cannot be built for
    this model is skipped with a status line); or a comma list of task and corpus names."""
    from headlab.data.targets import target_batch
    from headlab.data.tasks import TASKS

    spec = spec.strip()
    if spec == "none":
        return {}
    auto = spec == "auto"
    if auto:
        names = [t for t in TASKS if t != exclude_task] + ["python-docs"]
    else:
        names = [t.strip() for t in spec.split(",") if t.strip()]
    out: dict[str, tuple[Batch, str]] = {}
    for name in names:
        try:
            out[name] = target_batch(
                name, prepared.tokenizer, n=n, seed=seed,
                seq_len=None if name in TASKS else seq_len, corpus_seed_offset=7,
            )  # fmt: skip
        except ConfigError as err:
            if not auto:
                raise
            if on_status:
                on_status(f"off-target: skipping {name} ({err})")
    return out
