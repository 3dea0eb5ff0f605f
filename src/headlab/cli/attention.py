"""``headlab attention``: attention patterns and rollout of a prompt, and plausibility (attention
mass on a token set) vs faithfulness (exact causal effect) of every head on a task or corpus."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from headlab.cli.common import (
    add_data_args,
    add_model_args,
    add_run_args,
    add_stats_args,
    csv_list,
    int_list,
    parse_heads,
    positive_int,
)
from headlab.cli.common import status as status_printer
from headlab.cli.shared import (
    load_parts,
    open_run,
    prepared_inputs,
)
from headlab.errors import ConfigError
from headlab.runs import RunDir

NAME = "attention"
HELP = (
    "Attention patterns of a prompt (--prompt: layer x head grid, per-head figures with token "
    "labels, attention rollout) and plausibility vs faithfulness (--task/--data: heads ranked by "
    "attention mass on a token set vs by their exact ablation or patching effect, Spearman rho "
    "with a bootstrap CI, top-k overlap, scatter)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    add_data_args(p, default_data=None)
    g = p.add_argument_group("patterns")
    g.add_argument("--prompt", default=None, metavar="TEXT", help="prompt whose patterns to draw")
    g.add_argument(
        "--heads",
        type=parse_heads,
        default=None,
        metavar="L.H,...",
        help="also draw these heads one per figure",
    )
    g.add_argument(
        "--layers", type=int_list, default=None, metavar="L,...", help="grid: only these layers"
    )
    g.add_argument(
        "--prepend-bos",
        choices=["auto", "yes", "no"],
        default="auto",
        help="BOS before the prompt: the tokenizer's own convention, always, never",
    )
    g = p.add_argument_group("plausibility vs faithfulness (with --task or --data)")
    g.add_argument(
        "--keys",
        default="auto",
        choices=["auto", "answer", "wrong", "induction", "context", "previous"],
        help="token set whose attention mass is plausibility: auto = the answer's tokens in the "
        "prompt (names), the token after the earlier occurrence (induction), else positions "
        "1..q-1",
    )
    g.add_argument(
        "--tokens", default=None, metavar="WORD,...", help="these words as the token set instead"
    )
    g.add_argument(
        "--method",
        default="zero",
        help="causal effect: zero, mean, median, peak, resample[:SEED], scale:ALPHA, or patch "
        "(activations from the statistics split, position-aligned)",
    )
    g.add_argument("--metric", default=None, help="default: the task's metric, ce for corpora")
    g.add_argument(
        "--top-k",
        type=positive_int("--top-k"),
        default=10,
        help="top-k overlap of the two rankings",
    )
    g.add_argument(
        "--n-boot",
        type=positive_int("--n-boot"),
        default=1000,
        help="bootstrap resamples of examples",
    )
    g.add_argument("--ci", type=float, default=0.95, help="confidence level of the interval")
    g.add_argument(
        "--top", type=positive_int("--top"), default=5, help="heads to print per ranking"
    )
    add_stats_args(p)
    add_run_args(p)


def run(args: argparse.Namespace) -> int:
    from headlab.interventions import intervention_from_name

    say = status_printer(args)
    has_data = bool(args.task or args.data)
    if args.prompt is None and not has_data:
        raise ConfigError(
            "give --prompt TEXT (patterns and rollout) and/or --task NAME or --data PATH "
            "(plausibility vs faithfulness)"
        )
    if args.prompt is None and (args.heads or args.layers):
        raise ConfigError("--heads and --layers choose which patterns to draw; give --prompt TEXT")
    heads = parse_heads(args.heads) or []
    words = csv_list(args.tokens) if args.tokens else None
    if has_data and args.method != "patch":
        intervention_from_name(args.method)  # fail early on a bad name
    if not 0 < args.ci < 1 or args.n_boot < 0 or args.top_k < 1:
        raise ConfigError("need 0 < --ci < 1, --n-boot >= 0 and --top-k >= 1")
    prepared = prepared_inputs(args) if has_data else None
    if prepared is not None:
        model, tok = prepared.model, prepared.tokenizer
        identity: dict[str, Any] = {}
    else:
        from headlab.models.load import load_model, model_fingerprint

        model, tok = load_model(
            args.model, dtype=args.dtype, device=args.device, on_status=say,
            trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle,
        )  # fmt: skip
        fingerprint = model_fingerprint(model)
        identity = {
            "model": args.model, "dtype": args.dtype, "model_fingerprint": fingerprint,
            "trust_remote_code": args.trust_remote_code,
        }  # fmt: skip
    bos = {"auto": None, "yes": True, "no": False}[args.prepend_bos]
    identity |= {"prompt": args.prompt, "prepend_bos": bos}
    prompt = None
    if args.prompt is not None:  # refuse a prompt beyond the context before writing anything
        from headlab.analyses.attention import prompt_batch

        prompt = prompt_batch(tok, args.prompt, model=model, prepend_bos=bos)
    if has_data:
        identity |= {
            "keys": "words" if words else args.keys, "tokens": words, "method": args.method,
            "metric": args.metric, "stats": {"bins": args.bins, "reservoir": args.reservoir},
        }  # fmt: skip
    if prepared is not None:
        run_dir = open_run(args, "attention", prepared, identity)
    else:
        command = ["headlab", *sys.argv[1:]]
        run_dir = RunDir.open(
            args.out, kind="attention", identity=identity, command=command, force=args.force,
            on_status=say,
        )  # fmt: skip
    try:
        if prompt is not None:
            _patterns(args, run_dir, model, tok, prompt, heads)
        summary = _faithfulness(args, run_dir, prepared, words, say) if has_data else None
    except KeyboardInterrupt:
        run_dir.set_status("interrupted")
        raise
    run_dir.set_status("complete", **({} if summary is None else {"summary": summary}))
    print(f"\nrun directory: {run_dir.path}")
    return 0


def _patterns(args, run_dir: RunDir, model, tok, batch, heads) -> None:
    from headlab.analyses.attention import attention_map, attention_rollout
    from headlab.analyses.attention_plots import (
        attention_grid_figure,
        attention_head_figure,
        rollout_figure,
    )

    run_dir.save_tokens(batch, "prompt_tokens.safetensors")
    table = attention_map(model, tok, batch)
    rollout = attention_rollout(table)
    run_dir.save_table("patterns.parquet", table)
    run_dir.save_table("rollout.parquet", rollout)
    n_layers = int(table["layer"].max()) + 1
    panel = 1.1 if len(args.layers or range(n_layers)) <= 12 else 0.8
    grid = attention_grid_figure(table, layers=args.layers, panel=panel)
    run_dir.save_figure("attention_grid.png", grid)
    for ly, h in heads:
        run_dir.save_figure(f"head_L{ly}_H{h}.png", attention_head_figure(table, ly, h))
    run_dir.save_figure("rollout.png", rollout_figure(rollout))
    last = rollout[(rollout["layer"] == n_layers - 1) & (rollout["query"] == batch.seq_len - 1)]
    top = last.sort_values("weight", ascending=False).head(3)
    shown = ", ".join(f"{r.key}:{r.key_token!r} {r.weight:.2f}" for r in top.itertuples())
    print(
        f"prompt: {batch.seq_len} tokens; rollout of the last token after the last layer: {shown}"
    )
    figures = ["attention_grid.png", "rollout.png", *(f"head_L{ly}_H{h}.png" for ly, h in heads)]
    print(f"wrote patterns.parquet, rollout.parquet, {', '.join(figures)}")


def _faithfulness(args, run_dir: RunDir, prepared, words, say) -> dict[str, Any]:
    from headlab.analyses.attention import attention_mass
    from headlab.analyses.attention_faith import causal_parts, compare_rankings
    from headlab.analyses.attention_plots import faithfulness_figure
    from headlab.cli.shared import run_stats
    from headlab.interventions import intervention_from_name

    batch, layout = prepared.eval, prepared.layout
    done = run_dir.done_parts()
    if "mass" not in done:
        mass = attention_mass(
            prepared.model, batch, keys="words" if words else args.keys, words=words,
            tokenizer=prepared.tokenizer, batch_size=args.batch_size, layout=layout,
        )  # fmt: skip
        if mass["value"].isna().all():
            raise ConfigError(
                f"no example has a key token under --keys {mass['keys'].iloc[0]}; choose another "
                "--keys or --tokens words that occur in the prompts"
            )
        run_dir.save_part("mass", mass)
    stats = counterfactual = None
    if args.method == "patch":
        counterfactual = prepared.stats_batch
    elif intervention_from_name(args.method).needs is not None:
        stats = run_stats(
            run_dir, prepared, bins=args.bins, reservoir=args.reservoir, seed=args.seed,
            batch_size=args.batch_size, on_status=say,
        )  # fmt: skip
    todo = [ly for ly in range(layout.n_layers) if f"effect-L{ly:03d}" not in done]
    bar = None
    if todo and not args.quiet:
        from tqdm.auto import tqdm

        total = len(todo) * layout.n_heads * len(batch)
        bar = tqdm(total=total, desc=f"{args.method} effects", unit="ex", dynamic_ncols=True)
    try:
        for key, part in causal_parts(
            prepared.model, batch, method=args.method, metric=args.metric or prepared.metrics[0],
            stats=stats, counterfactual=counterfactual, batch_size=args.batch_size, skip=done,
            on_forward=bar.update if bar is not None else None, layout=layout,
        ):  # fmt: skip
            run_dir.save_part(key, part)
    finally:
        if bar is not None:
            bar.close()
    mass = load_parts(run_dir, "mass")
    effects = load_parts(run_dir, "effect-")
    table, summary = compare_rankings(
        mass, effects, n_boot=args.n_boot, ci=args.ci, seed=args.seed, top_k=args.top_k
    )
    run_dir.save_table("results.parquet", table)
    run_dir.save_table("summary.csv", summary)
    run_dir.save_figure("faithfulness.png", faithfulness_figure(table, summary, label_top=args.top))
    return _print(table, summary.iloc[0], args.top)


def _print(table, s, top: int) -> dict[str, Any]:
    by_p = table.sort_values("plausibility_rank").head(top)
    by_f = table.sort_values("faithfulness_rank").head(top)
    print(f"top heads by attention mass on '{s['keys']}' tokens (plausibility):")
    print("  " + ", ".join(f"L{r.layer}.H{r.head} {r.plausibility:.3f}" for r in by_p.itertuples()))
    print(f"top heads by |effect| of {s['method']} on {s['metric']} (faithfulness):")
    print("  " + ", ".join(f"L{r.layer}.H{r.head} {r.effect:+.3f}" for r in by_f.itertuples()))
    print(
        f"Spearman rho (mass vs |effect|, {s['n_heads']} heads) = {s['spearman']:.3f}, "
        f"{s['ci']:.0%} CI [{s['ci_low']:.3f}, {s['ci_high']:.3f}] over {s['n_examples']} "
        f"examples ({s['n_boot']} resamples); top-{s['top_k']} overlap {s['top_k_overlap']} "
        f"(chance {s['chance_overlap']:.1f})"
    )
    return {
        k: (float(v) if isinstance(v, float) else v.item() if hasattr(v, "item") else v)
        for k, v in s.items()
    }
