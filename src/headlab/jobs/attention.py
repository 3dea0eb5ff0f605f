"""The ``headlab attention`` job: a prompt's attention patterns and rollout (``patterns.parquet``,
``rollout.parquet``, their figures), and plausibility vs faithfulness on a task or corpus (part
``mass``, one part ``effect-L###`` per layer, ``results.parquet``, ``summary.csv``,
``faithfulness.png``), in one resumable run directory. With ``--method patch`` the causal effect
is exact patching from ``--counterfactual`` pairs (``counterfactual.safetensors``)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from headlab.batch import Batch
from headlab.defaults import DEFAULT_BINS, DEFAULT_N_STATS_BLOCKS
from headlab.errors import ConfigError
from headlab.heads import Head, check_heads
from headlab.jobs.base import (
    check_count,
    execute,
    identity_of,
    job_stats,
    load_parts,
    needs_stats,
    open_run,
    stats_config,
)
from headlab.jobs.executors import Executor, make_executor
from headlab.jobs.inputs import (
    Inputs,
    Prepared,
    counterfactual_source,
    placement,
    prepare,
    require_one_length,
    save_counterfactual,
    statistics_counterfactual,
)
from headlab.models.load import DEFAULT_MODEL
from headlab.runs import RunDir

__all__ = ["AttentionResult", "run_attention"]

#: ``--prepend-bos`` values: the tokenizer's own convention, always, never
PREPEND_BOS = {"auto": None, "yes": True, "no": False}


@dataclass
class AttentionResult:
    """What :func:`run_attention` produced (``None``: that half was not asked for).

    Attributes:
        run_dir: the run directory.
        prompt: the prompt's tokens (one example).
        patterns: every head's pattern of the prompt (:func:`~headlab.attention_map`).
        rollout: attention rollout after every layer (:func:`~headlab.attention_rollout`).
        table: one row per head: plausibility, faithfulness and both ranks.
        summary: one row: Spearman rho with its bootstrap CI, top-k overlap ...
        figures: by file name.
    """

    run_dir: RunDir
    prompt: Batch | None = None
    patterns: pd.DataFrame | None = None
    rollout: pd.DataFrame | None = None
    table: pd.DataFrame | None = None
    summary: pd.DataFrame | None = None
    figures: dict[str, Figure] = field(default_factory=dict, repr=False)


def run_attention(
    *,
    out: str | os.PathLike[str],
    model: str = DEFAULT_MODEL,
    data: str | None = None,
    task: str | None = None,
    prompt: str | None = None,
    heads: Sequence[Head] | None = None,
    layers: Sequence[int] | None = None,
    prepend_bos: str | bool | None = "auto",
    keys: str = "auto",
    tokens: Sequence[str] | None = None,
    method: str = "zero",
    metric: str | None = None,
    top_k: int = 10,
    n_boot: int = 1000,
    ci: float = 0.95,
    top: int = 5,
    bins: int = DEFAULT_BINS,
    reservoir: int = 16,
    seq_len: int | None = None,
    n_blocks: int = 8,
    n_stats_blocks: int = DEFAULT_N_STATS_BLOCKS,
    stats_data: str | None = None,
    text_field: str = "text",
    seed: int = 0,
    dtype: str = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    device_map: str | dict[str, int | str] | None = None,
    max_memory: dict[int | str, int | str] | None = None,
    offload_folder: str | None = None,
    batch_size: int = 8,
    executor: str | Executor = "serial",
    ray_address: str | None = None,
    workers: int | None = None,
    gpus_per_worker: float = 0.0,
    force: bool = False,
    progress: bool = False,
    on_status: Callable[[str], None] | None = None,
    command: list[str] | None = None,
    prepared: Prepared | None = None,
    counterfactual: str | os.PathLike[str] | None = None,
) -> AttentionResult:
    """Draw a prompt's patterns and/or compare plausibility with faithfulness, into a resumable
    run directory.

    Mirrors ``headlab attention``; see ``headlab attention --help`` for the meaning of every
    option. ``prompt`` asks for the patterns, ``data``/``task`` (or ``prepared``) for the
    comparison; ``prepend_bos`` is ``"auto"``/``None``, ``"yes"``/``True`` or ``"no"``/``False``;
    ``top`` heads of either ranking are labelled in the scatter. Prints nothing.

    ``counterfactual`` (``--counterfactual``): a JSONL file of clean/corrupted pairs, whose clean
    sides are then the examples (and, with ``method="patch"``, whose corrupted sides are patched
    in: faithfulness is each head's exact patching effect), or ``"builtin"`` (the default for
    ``--task names``/``capitals`` with ``patch``). ``patch`` on a corpus without pairs patches in
    the statistics split, as before.
    """
    source = counterfactual_source(counterfactual, task, [method])
    pairs_file = source not in (None, "builtin")
    has_data = bool(task or data or pairs_file) or prepared is not None
    if prompt is None and not has_data:
        raise ConfigError(
            "give --prompt TEXT (patterns and rollout) and/or --task NAME or --data PATH "
            "(plausibility vs faithfulness)"
        )
    if prompt is None and (heads or layers):
        raise ConfigError("--heads and --layers choose which patterns to draw; give --prompt TEXT")
    heads = check_heads(heads) if heads else []
    words = list(tokens) if tokens else None
    bos = _prepend_bos(prepend_bos)
    if has_data:
        from headlab.analyses.sweep import check_method

        check_method(method)  # fail early on a bad name
    if not 0 < ci < 1 or n_boot < 0 or top_k < 1:
        raise ConfigError("need 0 < --ci < 1, --n-boot >= 0 and --top-k >= 1")
    check_count("--top", top)
    check_count("--batch-size", batch_size)
    ex = make_executor(
        executor, ray_address=ray_address, workers=workers, gpus_per_worker=gpus_per_worker
    )
    if has_data and prepared is None:
        prepared = prepare(
            Inputs(
                model=model, dtype=dtype, device=device, data=None if task else data, task=task,
                text_field=text_field, seq_len=seq_len, n_blocks=n_blocks,
                n_stats_blocks=n_stats_blocks, stats_data=stats_data, seed=seed,
                trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
                device_map=device_map, max_memory=max_memory, offload_folder=offload_folder,
                counterfactual=source,
            ),
            on_status=on_status,
        )  # fmt: skip
    if prepared is not None:
        require_one_length(prepared, "plausibility (attention mass)")
        net, tok, layout = prepared.model, prepared.tokenizer, prepared.layout
        identity = identity_of(prepared, prompt=prompt, prepend_bos=bos)
    else:
        net, tok, layout, identity = _load(
            model, dtype=dtype, trust_remote_code=trust_remote_code,
            allow_pickle=allow_pickle, on_status=on_status,
            **placement(device, device_map, max_memory, offload_folder),
        )  # fmt: skip
        identity |= {"prompt": prompt, "prepend_bos": bos}
    heads = check_heads(heads, layout) if heads else []  # beyond the model: before any run
    prompt_ids = None
    if prompt is not None:  # refuse a prompt beyond the context before writing anything
        from headlab.analyses.attention import prompt_batch

        prompt_ids = prompt_batch(tok, prompt, model=net, prepend_bos=bos)
    if has_data:
        identity |= {
            "keys": "words" if words else keys, "tokens": words, "method": method,
            "metric": metric, "stats": {"bins": bins, "reservoir": reservoir},
        }  # fmt: skip
    with open_run(
        out, "attention", identity, tokens=None if prepared is None else prepared.eval,
        command=command, force=force, on_status=on_status,
    ) as run, ex:  # fmt: skip
        result = AttentionResult(run)
        if prompt_ids is not None:
            _patterns(result, net, tok, prompt_ids, layers=layers, heads=heads)
        summary = None
        if prepared is not None:
            summary = _faithfulness(
                result, prepared, keys=keys, words=words, method=method, metric=metric,
                top_k=top_k, n_boot=n_boot, ci=ci, top=top, bins=bins, reservoir=reservoir,
                seed=seed, batch_size=batch_size, progress=progress, on_status=on_status,
                executor=ex,
            )  # fmt: skip
        run.set_status("complete", **({} if summary is None else {"summary": summary}))
        return result


def _prepend_bos(value: str | bool | None) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    if value not in PREPEND_BOS:
        raise ConfigError(f"prepend_bos must be auto, yes, no, None, True or False; got {value!r}")
    return PREPEND_BOS[value]


def _load(model: str, **options: Any) -> tuple[Any, Any, Any, dict[str, Any]]:
    """``(model, tokenizer, layout, identity)`` of a prompt-only run (no data to prepare)."""
    from headlab.models.layout import describe
    from headlab.models.load import load_model, model_fingerprint

    net, tok = load_model(model, **options)
    identity = {
        "model": model, "dtype": options["dtype"], "model_fingerprint": model_fingerprint(net),
        "trust_remote_code": options["trust_remote_code"],
    }  # fmt: skip
    return net, tok, describe(net), identity


def _patterns(
    result: AttentionResult,
    net: Any,
    tok: Any,
    batch: Batch,
    *,
    layers: Sequence[int] | None,
    heads: Sequence[Head],
) -> None:
    from headlab.analyses.attention import attention_map, attention_rollout
    from headlab.plots.attention import prompt_figures

    run = result.run_dir
    run.save_tokens(batch, "prompt_tokens.safetensors")
    table = attention_map(net, tok, batch)
    rollout = attention_rollout(table)
    run.save_table("patterns.parquet", table)
    run.save_table("rollout.parquet", rollout)
    figures = prompt_figures(table, rollout, layers=layers, heads=heads)
    for name, fig in figures.items():
        run.save_figure(name, fig)
    result.prompt, result.patterns, result.rollout = batch, table, rollout
    result.figures.update(figures)


def _faithfulness(
    result: AttentionResult,
    prepared: Prepared,
    *,
    keys: str,
    words: list[str] | None,
    method: str,
    metric: str | None,
    top_k: int,
    n_boot: int,
    ci: float,
    top: int,
    bins: int,
    reservoir: int,
    seed: int,
    batch_size: int,
    progress: bool,
    on_status: Callable[[str], None] | None,
    executor: Executor,
) -> dict[str, Any]:
    """The comparison's parts, tables and figure; returns the manifest's summary."""
    from headlab.analyses.attention import (
        COUNTERFACTUAL,
        MassPart,
        compare_rankings,
        effect_parts,
    )
    from headlab.plots.attention import faithfulness_figure

    run, batch, layout = result.run_dir, prepared.eval, prepared.layout
    mass = MassPart("words" if words else keys, tuple(words) if words else None)
    # what the mass reads: computed first, so a key set without keys fails before any effect
    ctx = prepared.context(None, batch_size, tokenizer=True)
    execute(run, [mass], ctx, progress=progress, desc="attention mass", executor=executor)
    stats, batches = None, {}
    save_counterfactual(run, prepared.counterfactual)
    if method == "patch" and prepared.counterfactual is None:  # a corpus: the statistics split
        batches[COUNTERFACTUAL] = statistics_counterfactual(prepared)
        save_counterfactual(run, batches[COUNTERFACTUAL])
    elif needs_stats([method]):
        config = stats_config(bins, reservoir, seed, prepared.stats_batch)
        stats = job_stats(
            run, prepared, config, batch_size=batch_size, progress=progress, on_status=on_status
        )
    parts = effect_parts(layout, batch, method=method, metric=metric or prepared.metrics[0])
    ctx = prepared.context(stats, batch_size, batches)
    execute(run, parts, ctx, progress=progress, desc=f"{method} effects", executor=executor)
    table, summary = compare_rankings(
        load_parts(run, "mass"), load_parts(run, "effect-"), n_boot=n_boot, ci=ci,
        seed=seed, top_k=top_k,
    )  # fmt: skip
    run.save_table("results.parquet", table)
    run.save_table("summary.csv", summary)
    fig = faithfulness_figure(table, summary, label_top=top)
    run.save_figure("faithfulness.png", fig)
    result.table, result.summary = table, summary
    result.figures["faithfulness.png"] = fig
    return {
        k: (float(v) if isinstance(v, float) else v.item() if hasattr(v, "item") else v)
        for k, v in summary.iloc[0].items()
    }
