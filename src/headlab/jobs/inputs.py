"""What a job runs on: the model and data options every command shares (:class:`Inputs`), and
:func:`prepare`, which loads the model and builds the evaluation and statistics batches (and the
counterfactual batch that ``patch`` and ``atp:patch`` patch in)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from headlab.analyses.sweep import COUNTERFACTUAL
from headlab.batch import Batch
from headlab.data.images import DIGITS
from headlab.data.sentences import as_sentences
from headlab.data.tasks import PAIRED_TASKS
from headlab.defaults import DEFAULT_N_STATS_BLOCKS
from headlab.errors import ConfigError
from headlab.models.dispatch import dispatch_options
from headlab.models.kinds import is_bare, is_vision
from headlab.models.layout import Layout, describe, max_positions
from headlab.models.load import DEFAULT_MODEL, cached_fingerprint, load_model
from headlab.parts import Context, ModelSpec
from headlab.stats import Stats

if TYPE_CHECKING:
    from headlab.runs import RunDir

__all__ = [
    "BUILTIN",
    "COUNTERFACTUAL_FILE",
    "Inputs",
    "Prepared",
    "counterfactual_source",
    "needs_counterfactual",
    "off_target_batches",
    "placement",
    "prepare",
    "require_counterfactual",
    "require_one_length",
    "save_counterfactual",
    "statistics_counterfactual",
]

#: ``--counterfactual builtin``: the minimal pairs of ``--task names`` / ``capitals``
BUILTIN = "builtin"
#: where a run directory keeps the counterfactual inputs (beside ``tokens.safetensors``)
COUNTERFACTUAL_FILE = "counterfactual.safetensors"


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

    ``counterfactual`` (``--counterfactual``): ``None``; ``"builtin"``, the minimal pairs of
    ``task`` (``names``, ``capitals``); or the path of a JSONL file of clean/corrupted pairs
    (:mod:`headlab.data.counterfactual`), whose clean sides are then the evaluation examples
    (every pair; ``n_blocks`` becomes their number) and whose corrupted sides the statistics
    inputs unless ``stats_data`` is given.
    """

    model: str = DEFAULT_MODEL
    dtype: str = "float32"
    device: str = "cpu"
    data: str | None = "python-docs"
    task: str | None = None
    text_field: str = "text"
    seq_len: int | None = None
    n_blocks: int = 8
    n_stats_blocks: int = DEFAULT_N_STATS_BLOCKS
    stats_data: str | None = None
    seed: int = 0
    trust_remote_code: bool = False
    allow_pickle: bool = False
    device_map: str | dict[str, int | str] | None = None
    max_memory: dict[int | str, int | str] | None = None
    offload_folder: str | None = None
    counterfactual: str | None = None

    def __post_init__(self) -> None:
        if self.task is not None and self.data not in (None, "python-docs"):
            raise ConfigError("give either --data or --task, not both")
        self._check_counterfactual()
        placement(self.device, self.device_map, self.max_memory, self.offload_folder)
        if self.seq_len is not None and self.seq_len < 1:
            raise ConfigError(f"--seq-len must be a positive integer, got {self.seq_len}")
        if self.n_blocks < 1:
            raise ConfigError(f"--n-blocks must be at least 1, got {self.n_blocks}")
        if self.n_stats_blocks < 1:
            raise ConfigError(f"--n-stats-blocks must be at least 1, got {self.n_stats_blocks}")

    @property
    def pairs_file(self) -> str | None:
        """The ``--counterfactual`` JSONL file (``None``: none, or the built-in pairs)."""
        return None if self.counterfactual in (None, BUILTIN) else self.counterfactual

    def _check_counterfactual(self) -> None:
        if self.counterfactual is None:
            return
        if self.counterfactual == BUILTIN:
            if self.task not in PAIRED_TASKS:
                raise ConfigError(
                    f"--counterfactual builtin: built-in minimal pairs exist for --task "
                    f"{' and --task '.join(PAIRED_TASKS)}; for other data give --counterfactual "
                    "FILE.jsonl of clean/corrupted pairs"
                )
            return
        if self.task is not None:
            raise ConfigError(
                f"--counterfactual {self.counterfactual}: a pairs file brings its own examples "
                f"(its clean sides); drop --task {self.task}, or use --counterfactual builtin "
                "for the task's own minimal pairs"
            )
        if self.data not in (None, "python-docs"):
            raise ConfigError(
                "give either --data or --counterfactual FILE (whose clean sides are the "
                "examples), not both"
            )
        if self.seq_len is not None:
            raise ConfigError("--seq-len does not apply to --counterfactual FILE: pairs keep "
                              "their own token lengths; drop --seq-len")  # fmt: skip
        if not Path(self.counterfactual).is_file():
            raise ConfigError(
                f"--counterfactual {self.counterfactual}: no such file; give a JSONL file of "
                "clean/corrupted pairs, or 'builtin' with --task names or capitals"
            )

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
    #: the inputs ``patch`` records from, position-aligned with ``eval`` (``--counterfactual``)
    counterfactual: Batch | None = None

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
        spec so an executor may run the parts in other processes. The counterfactual, if any,
        is among the batches as ``"counterfactual"`` (unless ``batches`` names another)."""
        named = dict(batches or {})
        if self.counterfactual is not None:
            named.setdefault(COUNTERFACTUAL, self.counterfactual)
        return Context(
            self.model, self.layout, self.eval, stats, batch_size, named,
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
        # without a counterfactual the identity is what it always was (old runs still resume);
        # a pairs file is named by its tokens, not its path (a moved file resumes)
        source = inputs.pop("counterfactual")
        paired = {}
        if source is not None and self.counterfactual is not None:
            paired = {
                "counterfactual": BUILTIN if source == BUILTIN else "file",
                "counterfactual_fingerprint": batch_fingerprint(self.counterfactual),
            }
        return {
            **inputs,
            "device": None,  # where it ran does not change the numbers' identity
            "model_fingerprint": self.model_fingerprint,
            "eval_fingerprint": batch_fingerprint(self.eval),
            "stats_fingerprint": batch_fingerprint(self.stats_batch),
            **paired,
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
    if is_vision(model):  # images: scikit-learn's digits (headlab.data.images)
        return _prepare_images(inputs, model, tokenizer, layout)
    if tokenizer is None or not callable(getattr(tokenizer, "encode", None)):
        raise ConfigError(
            f"{inputs.model} has no text tokenizer; save one beside the model (save_pretrained)"
        )
    bare = is_bare(model)  # no LM head: scored by embed_cos on [CLS] ... [SEP] blocks
    if bare and (inputs.task is not None or inputs.counterfactual is not None):
        raise ConfigError(
            f"{inputs.model} is an encoder without an LM head: tasks and pairs are scored from "
            "logits; use a corpus (--data python-docs, scored by embed_cos, the cosine distance "
            "of the sentence embedding to the clean one)"
        )
    max_pos = max_positions(model)
    counterfactual = None
    if inputs.pairs_file is not None:
        return _prepare_pairs(inputs, model, tokenizer, layout, max_pos)
    if inputs.task is not None:
        seq = inputs.seq_len if inputs.task == "induction" else None
        task = load_task(inputs.task, tokenizer, n=inputs.n_blocks, seed=inputs.seed, seq_len=seq)
        evaluation, metric = task.eval, task.metric
        if inputs.counterfactual == BUILTIN:
            counterfactual = task.counterfactual
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
        if DIGITS in (inputs.data, inputs.stats_data):
            raise ConfigError(
                f"--data {DIGITS} is an image set; {inputs.model} reads text: use it with a "
                "vision model (--model digits-vit), or give a text corpus"
            )
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
        if bare:
            evaluation = as_sentences(evaluation, tokenizer)
            stats_batch = as_sentences(stats_batch, tokenizer)
            metrics = ["embed_cos"]
    return Prepared(
        inputs,
        model,
        tokenizer,
        layout,
        evaluation,
        stats_batch,
        metrics,
        cached_fingerprint(model),  # computed once: statistics and their checks reuse it
        counterfactual,
    )


def _prepare_images(inputs: Inputs, model: nn.Module, processor: Any, layout: Layout) -> Prepared:
    """``prepare`` for a vision model: images of ``--data digits`` (the default of
    ``digits-vit``), scored by ``cls_ce`` and ``cls_acc``; the data actually read is recorded."""
    from headlab.data.images import IMAGE_METRICS, image_batches
    from headlab.models.named import named_model

    if inputs.task is not None or inputs.counterfactual is not None or inputs.seq_len is not None:
        raise ConfigError(
            f"{inputs.model} is a vision model: --task, --counterfactual and --seq-len describe "
            f"text inputs, which it cannot read; drop them (its data: --data {DIGITS}). Commands "
            "built on text tasks (detect) do not apply to it"
        )
    named = named_model(inputs.model)
    data, evaluation, stats_batch = image_batches(
        inputs.data, model, inputs.model, n_eval=inputs.n_blocks, n_stats=inputs.n_stats_blocks,
        seed=inputs.seed, default=None if named is None else named.data,
        stats_data=inputs.stats_data,
    )  # fmt: skip
    return Prepared(
        replace(inputs, data=data), model, processor, layout, evaluation, stats_batch,
        list(IMAGE_METRICS), cached_fingerprint(model),
    )  # fmt: skip


def _prepare_pairs(
    inputs: Inputs, model: nn.Module, tokenizer: Any, layout: Layout, max_pos: int | None
) -> Prepared:
    """``prepare`` for a pairs file: the clean sides are the evaluation examples, the corrupted
    sides the counterfactual and (without ``stats_data``) the statistics inputs."""
    from headlab.data.blocks import make_blocks
    from headlab.data.corpora import load_texts
    from headlab.data.counterfactual import load_pairs

    pairs = load_pairs(inputs.pairs_file, tokenizer)
    evaluation = pairs.clean
    if max_pos is not None and evaluation.seq_len > max_pos:
        raise ConfigError(
            f"the pairs of {inputs.pairs_file} are up to {evaluation.seq_len} tokens but the "
            f"model has {max_pos} positions; shorten the longest pairs"
        )
    inputs = replace(inputs, data=None, n_blocks=len(pairs))
    stats_batch = pairs.corrupted
    if inputs.stats_data is not None:
        _, stats_batch = make_blocks(
            tokenizer, load_texts(inputs.stats_data, text_field=inputs.text_field),
            seq_len=evaluation.seq_len, n_blocks=1, n_stats_blocks=inputs.n_stats_blocks,
            seed=inputs.seed, max_positions=max_pos,
        )  # fmt: skip
    else:
        inputs = replace(inputs, n_stats_blocks=len(pairs))
    return Prepared(
        inputs, model, tokenizer, layout, evaluation, stats_batch, [pairs.metric],
        cached_fingerprint(model), pairs.corrupted,
    )  # fmt: skip


def needs_counterfactual(methods: Iterable[Any]) -> bool:
    """Whether any of ``methods`` (``patch``, ``atp:patch``, ``ablation:patch``, ``ig:patch:2``
    ...) patches in a counterfactual."""
    return any("patch" in str(m).split(":") for m in methods)


def counterfactual_source(
    counterfactual: str | os.PathLike[str] | None, task: str | None, methods: Iterable[Any]
) -> str | None:
    """The ``--counterfactual`` a job runs with: the one given, else ``builtin`` where ``task``
    has minimal pairs and a method patches (``patch``, ``atp:patch``), else ``None``."""
    if counterfactual is not None:
        return os.fspath(counterfactual)
    if task in PAIRED_TASKS and needs_counterfactual(methods):
        return BUILTIN
    return None


def require_counterfactual(counterfactual: object | None, methods: Iterable[Any]) -> None:
    """Refuse ``patch`` methods without a ``counterfactual`` (a source before :func:`prepare`,
    the batch after it), before any run directory."""
    if counterfactual is None and needs_counterfactual(methods):
        raise ConfigError(
            "method 'patch' patches in activations recorded on counterfactual inputs: give "
            '--counterfactual FILE.jsonl of clean/corrupted pairs (one {"clean": ..., '
            '"corrupted": ..., "answer": ...} per line), or use --task names or capitals '
            "(built-in minimal pairs)"
        )


def require_one_length(prepared: Prepared, what: str) -> None:
    """Refuse pairs of several token lengths (left-padded) where ``what`` reads attention
    patterns, which need unpadded sequences of one length."""
    if prepared.inputs.pairs_file is not None and prepared.eval.attention_mask is not None:
        real = prepared.eval.attention_mask.sum(1)
        raise ConfigError(
            f"{what} reads attention patterns, which need pairs of one token length; the pairs "
            f"of {prepared.inputs.pairs_file} are {int(real.min())} to {int(real.max())} tokens: "
            "keep the pairs of one length (e.g. one file per length)"
        )


def statistics_counterfactual(prepared: Prepared) -> Batch:
    """The counterfactual of a corpus (or ``induction``) run given none: the first
    ``len(eval)`` inputs of the statistics split, unrelated inputs of the same length (what
    ``estimate``'s ``atp:patch`` and ``attention``'s ``patch`` patch in without
    ``--counterfactual``)."""
    batch, donors = prepared.eval, prepared.stats_batch
    if len(donors) < len(batch) or donors.seq_len != batch.seq_len:
        raise ConfigError(
            "without --counterfactual, patching takes the statistics split, which needs at least "
            f"--n-blocks inputs of the same length ({len(donors)} x {donors.seq_len} for "
            f"{len(batch)} x {batch.seq_len}); give --counterfactual FILE.jsonl of pairs"
        )
    return donors.slice(0, len(batch))


def save_counterfactual(run: RunDir, counterfactual: Batch | None) -> None:
    """Save the counterfactual inputs as :data:`COUNTERFACTUAL_FILE` (once; with its checksum
    in the manifest, verified on resume like ``tokens.safetensors``)."""
    if counterfactual is not None and run.verified(COUNTERFACTUAL_FILE) is None:
        run.save_tokens(counterfactual, COUNTERFACTUAL_FILE)


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
    if is_vision(prepared.model):
        if auto:
            return out
        raise ConfigError(
            f"--off-target {spec}: off-target costs are measured on text, and "
            f"{prepared.inputs.model} reads images; use --off-target none"
        )
    bare = is_bare(prepared.model)  # no LM head: corpora scored by embed_cos, no tasks
    for name in names:
        try:
            if bare and name in TASKS:
                raise ConfigError(
                    f"task {name!r} is scored from logits and {prepared.inputs.model} has no LM "
                    "head; give corpora (scored by embed_cos)"
                )
            batch, metric = target_batch(
                name, prepared.tokenizer, n=n, seed=seed,
                seq_len=None if name in TASKS else seq_len, corpus_seed_offset=7,
            )  # fmt: skip
            if bare:
                batch, metric = as_sentences(batch, prepared.tokenizer), "embed_cos"
            out[name] = (batch, metric)
        except ConfigError as err:
            if not auto:
                raise
            if on_status:
                on_status(f"off-target: skipping {name} ({err})")
    return out
