"""``headlab attention``: attention patterns and rollout of a prompt, and plausibility (attention
mass on a token set) vs faithfulness (exact causal effect) of every head on a task or corpus."""

from __future__ import annotations

import argparse

from headlab.cli.common import (
    add_counterfactual_args,
    add_data_args,
    add_executor_args,
    add_model_args,
    add_run_args,
    add_stats_args,
    csv_list,
    data_kwargs,
    int_list,
    job_kwargs,
    parse_heads,
    positive_int,
)

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
        "(activations on the --counterfactual pairs' corrupted sides; a corpus without pairs: "
        "the statistics split, position-aligned)",
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
    add_counterfactual_args(
        p,
        extra=" attention: the pairs' clean sides are the examples whose plausibility and "
        "faithfulness are compared; with --method patch, faithfulness is each head's exact "
        "patching effect (its output on the corrupted side).",
    )
    add_run_args(p)
    add_executor_args(p)


def run(args: argparse.Namespace) -> int:
    from headlab.jobs.attention import run_attention

    result = run_attention(
        **job_kwargs(args),
        **data_kwargs(args),
        prompt=args.prompt,
        heads=parse_heads(args.heads),
        layers=args.layers,
        prepend_bos=args.prepend_bos,
        keys=args.keys,
        tokens=csv_list(args.tokens) if args.tokens else None,
        method=args.method,
        metric=args.metric,
        top_k=args.top_k,
        n_boot=args.n_boot,
        ci=args.ci,
        top=args.top,
        bins=args.bins,
        reservoir=args.reservoir,
    )
    if result.patterns is not None:
        print_patterns(result, parse_heads(args.heads) or [])
    if result.table is not None:
        print_faithfulness(result.table, result.summary.iloc[0], args.top)
    print(f"\nrun directory: {result.run_dir.path}")
    return 0


def print_patterns(result, heads) -> None:
    """Where the last token's rollout goes, and which files were written."""
    rollout, seq_len = result.rollout, result.prompt.seq_len
    n_layers = int(result.patterns["layer"].max()) + 1
    last = rollout[(rollout["layer"] == n_layers - 1) & (rollout["query"] == seq_len - 1)]
    top = last.sort_values("weight", ascending=False).head(3)
    shown = ", ".join(f"{r.key}:{r.key_token!r} {r.weight:.2f}" for r in top.itertuples())
    print(f"prompt: {seq_len} tokens; rollout of the last token after the last layer: {shown}")
    figures = ["attention_grid.png", "rollout.png", *(f"head_L{ly}_H{h}.png" for ly, h in heads)]
    print(f"wrote patterns.parquet, rollout.parquet, {', '.join(figures)}")


def print_faithfulness(table, s, top: int) -> None:
    """The top heads of both rankings and how well they agree."""
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
