"""``headlab steer``: select heads for a concept (Head-Pursuit scores, a concept-mass sweep, or a
list), generate from held-out prompts with them rescaled by each alpha, and compare concept
frequency and off-target cost with as many random heads at the same alphas.

The job is :func:`headlab.jobs.steer.run_steer`; this module only parses arguments and prints.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from headlab.cli.common import (
    add_executor_args,
    add_model_args,
    add_run_args,
    float_list,
    job_kwargs,
    non_negative_int,
    parse_heads,
    positive_int,
)

NAME = "steer"
HELP = (
    "Concept steering: pick heads for a concept (colours, numbers, or your words) by Head "
    "Pursuit (SOMP on the concept's unembedding directions), a concept-mass ablation sweep, or "
    "--heads; generate from held-out prompts with them rescaled by each alpha; report concept "
    "frequency and off-target cost (corpus CE, a task) against random heads at the same alpha."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    c = p.add_argument_group("concept")
    c.add_argument(
        "--concept",
        default="colours",
        metavar="NAME_OR_WORDS",
        help="built-in concept (colours, numbers), comma-separated words, or a file of words",
    )
    c.add_argument(
        "--prompts",
        default=None,
        metavar="FILE",
        help="held-out prompts to generate from, one a line (built-in concepts have their own)",
    )
    c.add_argument(
        "--select-prompts",
        default=None,
        metavar="FILE",
        help="prompts the heads are scored on (built-in concepts have their own; else --prompts)",
    )
    c.add_argument(
        "--multi-token",
        default="first",
        choices=["first", "refuse"],
        help="words with no single-token form: warn and use their first token, or stop",
    )
    s = p.add_argument_group("head selection")
    s.add_argument(
        "--select",
        default="pursuit",
        choices=["pursuit", "sweep", "heads"],
        help="pursuit: SOMP reconstruction score; sweep: zero-ablate each head, "
        "concept log-mass drop; heads: --heads",
    )
    s.add_argument(
        "--heads", type=parse_heads, default=None, metavar="L.H,...", help="steer these heads"
    )
    s.add_argument(
        "--k", type=positive_int("--k"), default=3, help="heads to select (3 is ~1%% of 270)"
    )
    s.add_argument(
        "--controls",
        type=non_negative_int("--controls"),
        default=3,
        help="random-token dictionaries of the concept's size; heads are ranked by pursuit score "
        "minus their mean score on these (0: the raw score)",
    )
    s.add_argument(
        "--steps", type=positive_int("--steps"), default=5, help="SOMP steps (atoms) per head"
    )
    s.add_argument(
        "--positions",
        default="last",
        choices=["last", "all"],
        help="head outputs at each selection prompt's last token, or at every token but the first",
    )
    g = p.add_argument_group("generation")
    g.add_argument(
        "--alphas",
        type=float_list,
        default="-1,0,0.5,2,5",
        metavar="A,B,...",
        help="scales of the heads' outputs (1 = clean); a list that starts with a negative "
        "number needs '=': --alphas=-1,0,5",
    )
    g.add_argument(
        "--n-random",
        type=non_negative_int("--n-random"),
        default=3,
        help="random head sets (seeds)",
    )
    g.add_argument(
        "--max-new-tokens",
        type=positive_int("--max-new-tokens"),
        default=24,
        help="tokens generated per prompt",
    )
    g.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    g.add_argument(
        "--top-k",
        type=non_negative_int("--top-k"),
        default=50,
        help="sample from the k likeliest (0: all)",
    )
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    g.add_argument(
        "--seed",
        type=int,
        default=0,
        help="sampling seed (same in every condition) and first random-head seed",
    )
    g.add_argument(
        "--gen-batch-size",
        type=positive_int("--gen-batch-size"),
        default=16,
        help="prompts per generate call",
    )
    o = p.add_argument_group("off-target cost")
    o.add_argument(
        "--data",
        default="python-docs",
        metavar="NAME_OR_PATH",
        help="corpus whose cross-entropy is measured ('none' to skip)",
    )
    o.add_argument(
        "--seq-len", type=positive_int("--seq-len"), default=64, help="tokens per corpus block"
    )
    o.add_argument("--n-blocks", type=positive_int("--n-blocks"), default=8, help="corpus blocks")
    o.add_argument(
        "--off-task",
        default="capitals",
        metavar="NAME",
        help="built-in task scored with its own metric ('none' to skip)",
    )
    o.add_argument("--n-task", type=positive_int("--n-task"), default=16, help="task examples")
    add_run_args(p)
    add_executor_args(p)


def _lines(path: str | None) -> list[str] | None:
    if path is None:
        return None
    return [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip()]


def run(args: argparse.Namespace) -> int:
    from headlab.errors import ConfigError
    from headlab.jobs.steer import run_steer

    for opt in ("prompts", "select_prompts"):
        path = getattr(args, opt)
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"--{opt.replace('_', '-')} {path}: no such file (one prompt a line)")
    none = {"none", ""}
    res = run_steer(
        **job_kwargs(args),
        concept=args.concept,
        prompts=_lines(args.prompts),
        select_prompts=_lines(args.select_prompts),
        multi_token=args.multi_token,
        select=args.select,
        heads=parse_heads(args.heads),
        k=args.k,
        steps=args.steps,
        controls=args.controls,
        positions=args.positions,
        alphas=args.alphas,
        n_random=args.n_random,
        max_new_tokens=args.max_new_tokens,
        greedy=args.greedy,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        gen_batch_size=args.gen_batch_size,
        off_task=None if args.off_task.lower() in none else args.off_task,
        n_task=args.n_task,
        model=args.model,
        data=None if args.data.lower() in none else args.data,
        seq_len=args.seq_len,
        n_blocks=args.n_blocks,
        seed=args.seed,
        dtype=args.dtype,
        device=args.device,
        trust_remote_code=args.trust_remote_code,
        allow_pickle=args.allow_pickle,
        device_map=args.device_map,
        max_memory=args.max_memory,
        offload_folder=args.offload_folder,
    )
    _print(res)
    print(f"\nrun directory: {res.run_dir.path}")
    return 0


def _f(x: float, spec: str = ".3f") -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _print(res) -> None:
    scores = res.scores.set_index(["layer", "head"])
    picked = ", ".join(
        f"{ly}.{h} (pursuit {_f(scores.loc[(ly, h), 'value'])})" for ly, h in res.selected
    )
    print(f"selected heads: {picked}")
    s = res.summary
    others = [c[2:-9] for c in s.columns if c.startswith("d_") and c.endswith("_selected")]
    clean = s["clean_rate"].iloc[0] if len(s) else math.nan
    print(f"concept rate (concept words / generated words); clean model (alpha=1): {_f(clean)}")
    head = f"{'alpha':>6} {'selected':>9} {'random mean ± sd':>18}"
    for name in others:
        head += f" {'Δ' + name + ' sel':>22} {'rand':>8}"
    print(head)
    for d in s.to_dict("records"):
        line = f"{d['alpha']:>6g} {_f(d['selected_rate']):>9} "
        line += f"{_f(d['random_mean']) + ' ± ' + _f(d['random_sd']):>18}"
        for name in others:
            line += f" {_f(d[f'd_{name}_selected'], '+.3f'):>22}"
            line += f" {_f(d[f'd_{name}_random'], '+.3f'):>8}"
        print(line)
    gens = res.generations
    sel = gens[gens["selection"] == "selected"]
    if not sel.empty:
        print("\nsample generations (selected heads, first prompt):")
        first = gens[gens["prompt_index"] == 0]
        print(f"  prompt: {first['prompt'].iloc[0]!r}")
        clean_text = first[first["selection"] == "clean"]["text"]
        if len(clean_text):
            print(f"  {'clean':>8}: {clean_text.iloc[0].strip()[:100]!r}")
        for row in first[first["selection"] == "selected"].itertuples():
            print(f"  {'a=' + format(row.alpha, 'g'):>8}: {row.text.strip()[:100]!r}")
