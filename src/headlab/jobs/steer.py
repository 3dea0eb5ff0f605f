"""The ``headlab steer`` job: pick concept heads, generate under each alpha against random-head
controls, measure concept frequency and off-target cost, and write a resumable run directory.

Every condition (clean; selected heads or one random set at one alpha) is a
:class:`~headlab.analyses.steer.SteerPart`, saved as it finishes as two parts
(``parts/gen-<condition>.parquet``, then ``parts/steer-<condition>.parquet``); a condition with
both is done, so re-running the same command resumes after the last one. With ``select="sweep"``
the concept-mass sweep is the part ``select-sweep``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from headlab.analyses.steer import (
    ConditionOutput,
    GenerateConfig,
    SelectSweepPart,
    SteerConfig,
    SteerPart,
    concept_batch,
    concept_tokens,
    control_token_sets,
    encode_prompts,
    get_concept,
    pursuit_scores,
    random_sets,
    select_heads,
    steer_context,
    steer_plan,
    steer_summary,
    steer_targets,
    with_baseline,
)
from headlab.batch import Batch
from headlab.data.targets import target_batch
from headlab.data.tasks import TASKS
from headlab.errors import ConfigError
from headlab.heads import Head, check_heads
from headlab.jobs.base import Say, check_count, execute, load_parts, open_run
from headlab.jobs.executors import Executor, make_executor
from headlab.jobs.inputs import Prepared, placement
from headlab.models.kinds import is_bare
from headlab.models.layout import describe, max_positions
from headlab.models.load import DEFAULT_MODEL, cached_fingerprint, load_model
from headlab.parts import Context, ModelSpec, Part
from headlab.plots.steer import steer_figure
from headlab.runs import RunDir

__all__ = ["SteerRun", "run_steer"]

SELECT_MODES = ("pursuit", "sweep", "heads")


@dataclass
class SteerRun:
    """What :func:`run_steer` produced.

    Attributes:
        table: tidy results (``selection, seed, alpha, n_heads, heads, target, metric, value,
            baseline, delta, sd, n``).
        summary: one row per alpha (selected rate, random mean and sd, off-target deltas).
        scores: the pursuit score of every head (``heads.csv``).
        sweep: the concept-mass sweep of every head (sweep mode only, ``heads_sweep.csv``).
        selected: the steered heads; ``random``: the control sets by seed.
        generations: every generated text with its prompt and per-prompt concept rate.
    """

    table: pd.DataFrame
    summary: pd.DataFrame
    scores: pd.DataFrame
    selected: list[Head]
    random: dict[int, list[Head]]
    generations: pd.DataFrame
    run_dir: RunDir
    sweep: pd.DataFrame | None = None
    figures: dict[str, Figure] = field(default_factory=dict, repr=False)


def _off_targets(
    tokenizer: Any,
    *,
    data: str | None,
    seq_len: int,
    n_blocks: int,
    off_task: str | None,
    n_task: int,
    seed: int,
    max_pos: int | None,
) -> dict[str, tuple[Batch, str]]:
    """The off-target measures: ``n_blocks`` blocks of corpus ``data`` (``ce``, named by its base
    name) and ``n_task`` examples of task ``off_task`` (its own metric)."""
    targets: dict[str, tuple[Batch, str]] = {}
    if data:
        if data in TASKS:
            raise ConfigError(
                f"--data {data!r} is a task; --data names a corpus (or 'none'), give the task as "
                "--off-task"
            )
        name = os.path.basename(str(data).rstrip("/")) or str(data)
        targets[name] = target_batch(
            data, tokenizer, n=n_blocks, seed=seed, seq_len=seq_len, max_positions=max_pos
        )
    if off_task:
        if off_task not in TASKS:
            raise ConfigError(
                f"unknown task {off_task!r}; built-in tasks: {', '.join(TASKS)} (--off-task none "
                "to skip)"
            )
        targets[off_task] = target_batch(off_task, tokenizer, n=n_task, seed=seed)
    return targets


def _save_condition(run: RunDir, part: Part, output: Any) -> None:
    assert isinstance(part, SteerPart) and isinstance(output, ConditionOutput)
    run.save_part(part.gen_key, output.generations)
    run.save_part(part.key, output.table)


def _select_sweep(
    run: RunDir,
    ctx: Context,
    token_ids: Sequence[int],
    *,
    progress: bool,
    say: Say,
    executor: Executor,
) -> pd.DataFrame:
    """The concept-mass sweep of every head on the selection prompts ``ctx.batch`` (the part
    ``select-sweep``: computed once, then read back)."""
    part = SelectSweepPart(tuple(token_ids))
    if part.key in run.done_parts():
        return run.read_part(part.key)
    if say:
        say(f"sweeping every head: concept log-mass on {len(ctx.batch)} prompts")
    fresh: dict[str, pd.DataFrame] = {}
    execute(
        run, [part], ctx, progress=progress, desc="concept sweep",
        on_done=lambda p, table: fresh.update({p.key: table}), executor=executor,
    )  # fmt: skip
    return fresh[part.key]


def run_steer(
    *,
    out: str | os.PathLike[str],
    concept: str | Sequence[str] = "colours",
    prompts: Sequence[str] | None = None,
    select_prompts: Sequence[str] | None = None,
    multi_token: str = "first",
    select: str = "pursuit",
    heads: Sequence[Head] | None = None,
    k: int = 3,
    steps: int = 5,
    positions: str = "last",
    controls: int = 3,
    alphas: Sequence[float] = (-1.0, 0.0, 0.5, 2.0, 5.0),
    n_random: int = 3,
    max_new_tokens: int = 24,
    greedy: bool = False,
    temperature: float = 1.0,
    top_k: int = 50,
    top_p: float = 1.0,
    gen_batch_size: int = 16,
    off_task: str | None = "capitals",
    n_task: int = 16,
    model: str = DEFAULT_MODEL,
    data: str | None = "python-docs",
    seq_len: int = 64,
    n_blocks: int = 8,
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
) -> SteerRun:
    """Select concept heads, steer generation with them and with random heads, write ``out``.

    Mirrors ``headlab steer`` (see its ``--help`` for every option): ``data`` is the corpus whose
    cross-entropy is the off-target cost (``None``: none) and ``off_task`` a task scored with its
    own metric (``None``: none). ``prepared`` reuses a loaded model (its ``model``, ``dtype`` and
    ``trust_remote_code`` replace those given). Returns the tables and the figure; prints nothing
    unless ``progress``.
    """
    if heads:
        select = "heads"
    if select not in SELECT_MODES:
        raise ConfigError(f"unknown selection {select!r}; choose from {', '.join(SELECT_MODES)}")
    if select == "heads" and not heads:
        raise ConfigError("--select heads needs --heads L.H,... (e.g. --heads 3.5,10.1)")
    for name, value, low in (("--k", k, 1), ("--steps", steps, 1), ("--controls", controls, 0),
                             ("--n-random", n_random, 0), ("--max-new-tokens", max_new_tokens, 1),
                             ("--top-k", top_k, 0), ("--gen-batch-size", gen_batch_size, 1),
                             ("--seq-len", seq_len, 1), ("--n-blocks", n_blocks, 1),
                             ("--n-task", n_task, 1), ("--batch-size", batch_size, 1)):  # fmt: skip
        check_count(name, value, low=low)
    ex = make_executor(
        executor, ray_address=ray_address, workers=workers, gpus_per_worker=gpus_per_worker
    )
    if heads:
        heads = check_heads(heads)  # repeats and non-pairs: refused before loading anything
    the_concept = get_concept(concept, prompts=prompts, select_prompts=select_prompts)
    gen = GenerateConfig(
        max_new_tokens=max_new_tokens, greedy=greedy, temperature=temperature, top_k=top_k,
        top_p=top_p, seed=seed, batch_size=gen_batch_size,
    )  # fmt: skip
    config = SteerConfig(
        alphas=tuple(alphas), n_random=n_random, seed=seed, generate=gen, batch_size=batch_size
    )
    if prepared is None:
        spec = ModelSpec(model, dtype, device, trust_remote_code, allow_pickle)
        net, tok = load_model(
            model, dtype=dtype, on_status=on_status,
            trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
            **placement(device, device_map, max_memory, offload_folder),
        )  # fmt: skip
        layout = describe(net)
    else:
        net, tok, layout = prepared.model, prepared.tokenizer, prepared.layout
        spec = prepared.inputs.spec
        model, dtype = prepared.inputs.model, prepared.inputs.dtype
        trust_remote_code = prepared.inputs.trust_remote_code
    if tok is None or not callable(getattr(tok, "batch_decode", None)):
        raise ConfigError(f"{model} has no text tokenizer; steering generates text")
    if is_bare(net):
        raise ConfigError(
            f"{model} cannot generate text (it has no LM head: a sentence encoder); steering "
            "generates, so use a causal LM (the default smollm2-135m, or a folder of one)"
        )
    if heads:
        heads = check_heads(heads, layout)  # beyond the model: before any work
    encode_prompts(net, tok, the_concept.prompts, max_new_tokens)  # refuse before any work
    tokens = concept_tokens(tok, the_concept.words, multi=multi_token)
    off = _off_targets(
        tok, data=data, seq_len=seq_len, n_blocks=n_blocks, off_task=off_task, n_task=n_task,
        seed=seed, max_pos=max_positions(net),
    )  # fmt: skip
    identity = {
        "model": model,
        "dtype": dtype,
        "trust_remote_code": trust_remote_code,
        "model_fingerprint": cached_fingerprint(net),
        "concept": asdict(the_concept),
        "token_ids": list(tokens.token_ids),
        "select": select,
        "heads": [list(h) for h in heads or []],
        "k": k,
        "steps": steps,
        "positions": positions,
        "controls": controls,
        "config": asdict(config),
        "data": data,
        "seq_len": seq_len,
        "n_blocks": n_blocks,
        "off_task": off_task,
        "n_task": n_task,
    }
    say = on_status or (lambda msg: None)
    with (
        open_run(out, "steer", identity, command=command, force=force, on_status=on_status) as run,
        ex,
    ):
        labels: dict[int, str] = {}
        for row in tokens.table.itertuples():
            labels.setdefault(int(row.token_id), row.form.replace(" ", "_"))
        sel_batch = concept_batch(tok, the_concept.select_prompts)
        say(f"scoring every head by pursuit on {len(sel_batch)} selection prompts")
        ctl = control_token_sets(
            tok, len(tokens.token_ids), controls, seed=seed, exclude=tokens.token_ids
        )
        scores = pursuit_scores(
            net, sel_batch, tokens.token_ids, steps=steps, positions=positions, controls=ctl,
            labels=[labels[t] for t in tokens.token_ids], layout=layout,
        )  # fmt: skip
        run.save_table("heads.csv", scores)
        chosen = scores
        if select == "sweep":
            ctx = Context(net, layout, sel_batch, batch_size=batch_size, spec=spec)
            chosen = _select_sweep(
                run, ctx, tokens.token_ids, progress=progress, say=say, executor=ex
            )
            run.save_table("heads_sweep.csv", chosen)
        selected = list(heads) if heads else select_heads(chosen, k)
        say("steering heads " + ", ".join(f"{ly}.{h}" for ly, h in selected))
        targets = steer_targets(tok, the_concept, off, tokens.token_ids)
        parts = steer_plan(selected, layout, the_concept, config, targets)
        finished = run.done_parts()
        ctx = replace(steer_context(net, tok, layout, the_concept, config, targets), spec=spec)
        execute(
            run, parts, ctx, progress=progress, desc="steer conditions", unit="cond",
            done=lambda p: {p.key, p.gen_key} <= finished, save=_save_condition, executor=ex,
        )  # fmt: skip
        table = with_baseline(load_parts(run, "steer-"))
        gens = load_parts(run, "gen-")
        summary = steer_summary(table)
        run.save_table("results.parquet", table)
        run.save_table("summary.csv", summary)
        with run.atomic("generations.jsonl") as tmp:
            gens.to_json(tmp, orient="records", lines=True, force_ascii=False)
        title = f"{the_concept.name}: heads {', '.join(f'{ly}.{h}' for ly, h in selected)}"
        figures = {"steer.png": steer_figure(table, summary, title=title)}
        for name, fig in figures.items():
            run.save_figure(name, fig)
        rand = random_sets(layout, len(selected), n_random, seed=seed, exclude=selected)
        run.set_status(
            "complete",
            heads=[list(h) for h in selected],
            random={str(s): [list(h) for h in v] for s, v in rand.items()},
        )
        sweep = chosen if select == "sweep" else None
        return SteerRun(table, summary, scores, selected, rand, gens, run, sweep, figures)
