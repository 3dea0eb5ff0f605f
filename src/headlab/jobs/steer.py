"""The ``headlab steer`` job: pick concept heads, generate under each alpha against random-head
controls, measure concept frequency and off-target cost, and write a resumable run directory.

:func:`run_steer` mirrors the command for notebooks. Every condition (clean; selected heads or one
random set at one alpha) is saved as it finishes (``parts/steer-<condition>.parquet`` and
``parts/gen-<condition>.parquet``), so re-running the same command resumes after the last one.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from headlab.errors import ConfigError
from headlab.models.load import DEFAULT_MODEL
from headlab.runs import RunDir

__all__ = ["SteerRun", "run_steer"]

Head = tuple[int, int]
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


def _targets(
    model_tok: Any,
    data: str | None,
    seq_len: int,
    n_blocks: int,
    off_task: str | None,
    n_task: int,
    seed: int,
    max_pos: int | None,
) -> dict[str, tuple[Any, str]]:
    from headlab.data.blocks import make_blocks
    from headlab.data.corpora import load_texts
    from headlab.data.tasks import load_task

    targets: dict[str, tuple[Any, str]] = {}
    if data:
        blocks, _ = make_blocks(
            model_tok,
            load_texts(data),
            seq_len=seq_len,
            n_blocks=n_blocks,
            n_stats_blocks=1,
            seed=seed,
            max_positions=max_pos,
        )
        targets[os.path.basename(str(data).rstrip("/")) or str(data)] = (blocks, "ce")
    if off_task:
        task = load_task(off_task, model_tok, n=n_task, seed=seed)
        targets[off_task] = (task.eval, task.metric)
    return targets


def _parts(run: RunDir, prefix: str) -> pd.DataFrame:
    table = run.load_parts(prefix)  # each part checked against its checksum
    if table is None:
        raise ConfigError(f"run directory {run.path} has no {prefix}* parts")
    return table


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
    seed: int = 0,
    data: str | None = "python-docs",
    seq_len: int = 64,
    n_blocks: int = 8,
    off_task: str | None = "capitals",
    n_task: int = 16,
    model: str = DEFAULT_MODEL,
    dtype: str = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    batch_size: int = 8,
    gen_batch_size: int = 16,
    force: bool = False,
    progress: bool = False,
    on_status: Callable[[str], None] | None = None,
    command: list[str] | None = None,
) -> SteerRun:
    """Select concept heads, steer generation with them and with random heads, write ``out``;
    mirrors ``headlab steer`` (see its ``--help`` for every option)."""
    from headlab.analyses.concepts import concept_tokens, get_concept
    from headlab.analyses.steer import (
        GenerateConfig,
        SteerConfig,
        conditions,
        random_sets,
        steer_parts,
        with_baseline,
    )
    from headlab.analyses.steer_generate import encode_prompts
    from headlab.analyses.steer_plots import steer_figure, steer_summary
    from headlab.analyses.steer_select import (
        concept_batch,
        control_token_sets,
        pursuit_scores,
        select_heads,
        sweep_scores,
    )
    from headlab.heads import check_heads
    from headlab.models.layout import describe, max_positions
    from headlab.models.load import load_model, model_fingerprint

    say = on_status or (lambda msg: None)
    if heads:
        select = "heads"
    if select not in SELECT_MODES:
        raise ConfigError(f"unknown selection {select!r}; choose from {', '.join(SELECT_MODES)}")
    if select == "heads" and not heads:
        raise ConfigError("--select heads needs --heads L.H,... (e.g. --heads 3.5,10.1)")
    if k < 1:
        raise ConfigError(f"--k must be at least 1, got {k}")
    the_concept = get_concept(concept, prompts=prompts, select_prompts=select_prompts)
    gen = GenerateConfig(
        max_new_tokens=max_new_tokens,
        greedy=greedy,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        batch_size=gen_batch_size,
    )
    config = SteerConfig(
        alphas=tuple(alphas), n_random=n_random, seed=seed, generate=gen, batch_size=batch_size
    )
    net, tok = load_model(
        model, dtype=dtype, device=device, on_status=on_status,
        trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
    )  # fmt: skip
    if tok is None or not callable(getattr(tok, "batch_decode", None)):
        raise ConfigError(f"{model} has no text tokenizer; steering generates text")
    layout = describe(net)
    if heads:
        heads = check_heads(heads, layout)  # repeated or beyond the model: before any work
    encode_prompts(net, tok, the_concept.prompts, max_new_tokens)  # refuse before any work
    tokens = concept_tokens(tok, the_concept.words, multi=multi_token)
    targets = _targets(tok, data, seq_len, n_blocks, off_task, n_task, seed, max_positions(net))
    identity = {
        "model": model,
        "dtype": dtype,
        "trust_remote_code": trust_remote_code,
        "model_fingerprint": model_fingerprint(net),
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
    run = RunDir.open(
        out, kind="steer", identity=identity, command=command, force=force, on_status=on_status
    )
    try:
        labels = {}
        for row in tokens.table.itertuples():
            labels.setdefault(int(row.token_id), row.form.replace(" ", "_"))
        sel_batch = concept_batch(tok, the_concept.select_prompts)
        say(f"scoring every head by pursuit on {len(sel_batch)} selection prompts")
        ctl = control_token_sets(
            tok, len(tokens.token_ids), controls, seed=seed, exclude=tokens.token_ids
        )
        scores = pursuit_scores(
            net,
            sel_batch,
            tokens.token_ids,
            steps=steps,
            positions=positions,
            controls=ctl,
            labels=[labels[t] for t in tokens.token_ids],
            layout=layout,
        )
        run.save_table("heads.csv", scores)
        chosen = scores
        if select == "sweep":
            if "select-sweep" in run.done_parts():
                chosen = run.read_part("select-sweep")
            else:
                say(f"sweeping every head: concept log-mass on {len(sel_batch)} prompts")
                chosen = sweep_scores(
                    net, sel_batch, tokens.token_ids, batch_size=batch_size, layout=layout
                )
                run.save_part("select-sweep", chosen)
            run.save_table("heads_sweep.csv", chosen)
        if select == "heads":
            selected = [(int(ly), int(h)) for ly, h in heads]  # type: ignore[union-attr]
            for ly, h in selected:
                layout.check_head(ly, h)
        else:
            selected = select_heads(chosen, k)
        say("steering heads " + ", ".join(f"{ly}.{h}" for ly, h in selected))
        conds = conditions(selected, layout, config)
        done = run.done_parts()
        skip = {c.key for c in conds if {f"steer-{c.key}", f"gen-{c.key}"} <= done}
        bar = None
        if progress and len(conds) > len(skip):
            from tqdm.auto import tqdm

            bar = tqdm(
                total=len(conds) - len(skip),
                desc="steer conditions",
                unit="cond",
                dynamic_ncols=True,
            )
        try:
            for part in steer_parts(
                net,
                tok,
                the_concept,
                selected,
                config=config,
                targets=targets,
                token_ids=tokens.token_ids,
                skip=skip,
                layout=layout,
            ):
                run.save_part(f"gen-{part.condition.key}", part.generations)
                run.save_part(f"steer-{part.condition.key}", part.table)
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        table = with_baseline(_parts(run, "steer-"))
        gens = _parts(run, "gen-")
        summary = steer_summary(table)
        run.save_table("results.parquet", table)
        run.save_table("summary.csv", summary)
        with run.atomic("generations.jsonl") as tmp:
            gens.to_json(tmp, orient="records", lines=True, force_ascii=False)
        title = f"{the_concept.name}: heads {', '.join(f'{ly}.{h}' for ly, h in selected)}"
        figures = {"steer.png": steer_figure(table, title=title)}
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
    except KeyboardInterrupt:
        run.set_status("interrupted")
        raise
    finally:
        run.close()
