"""``headlab shift``: how far an ablation pushes the downstream activations out of distribution,
comparing methods on the top-k heads of a sweep."""

from __future__ import annotations

import argparse

from headlab.cli.common import (
    add_data_args,
    add_model_args,
    add_run_args,
    add_stats_args,
    csv_list,
    parse_heads,
    positive_int,
)
from headlab.cli.common import status as status_printer
from headlab.cli.shared import (
    load_parts,
    load_sweep,
    open_run,
    prepared_inputs,
    run_stats,
    saved_sweep,
)
from headlab.errors import ConfigError

NAME = "shift"
HELP = (
    "Distribution shift under ablation: per downstream layer, residual-norm ratio to the clean "
    "run and fraction of activations beyond 3 sd of clean, plus output KL, for zero / mean / "
    "peak / resample on the top-k heads of a sweep."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    add_data_args(p)
    g = p.add_argument_group("shift")
    g.add_argument("--method", default="zero,mean,peak,resample", help="comma-separated methods")
    g.add_argument(
        "--top-k", type=positive_int("--top-k"), default=5, help="ablate the k most important heads"
    )
    g.add_argument(
        "--heads", type=parse_heads, default=None, metavar="L.H,...", help="these heads instead"
    )
    g.add_argument("--sweep", default=None, metavar="DIR", help="a headlab sweep run to rank by")
    g.add_argument(
        "--rank-method", default="zero", help="the sweep method whose ranking picks the heads"
    )
    g.add_argument("--each", action="store_true", help="also ablate each head alone")
    g.add_argument(
        "--skip-first", action="store_true", help="leave position 0 out of the residual measures"
    )
    add_stats_args(p)
    add_run_args(p)


def run(args: argparse.Namespace) -> int:
    from headlab.analyses.shift import conditions, shift, shift_figure
    from headlab.analyses.sweep import rank_heads

    say = status_printer(args)
    methods = csv_list(args.method)
    if args.top_k < 1:
        raise ConfigError(f"--top-k must be at least 1, got {args.top_k}")
    prepared = prepared_inputs(args)
    heads = parse_heads(args.heads, prepared.layout)  # heads beyond the model: before any work
    extra = {
        "methods": methods, "top_k": args.top_k, "heads": heads, "sweep": args.sweep,
        "rank_method": args.rank_method, "each": args.each, "skip_first": args.skip_first,
        "stats": {"bins": args.bins, "reservoir": args.reservoir},
    }  # fmt: skip
    run_dir = open_run(args, "shift", prepared, extra)
    try:
        stats = run_stats(
            run_dir, prepared, bins=args.bins, reservoir=args.reservoir, seed=args.seed,
            batch_size=args.batch_size, on_status=say,
        )  # fmt: skip
        if heads is None:
            metric = prepared.metrics[0]
            if args.sweep:
                table, _ = load_sweep(args.sweep, prepared)
            else:
                if say:
                    say(f"no --sweep or --heads: sweeping every head ({args.rank_method})")
                table = saved_sweep(
                    run_dir, prepared, methods=[args.rank_method], metrics=[metric],
                    stats=stats, batch_size=args.batch_size,
                )  # fmt: skip
            ranked = rank_heads(table)
            ranked = ranked[(ranked["method"] == args.rank_method) & (ranked["metric"] == metric)]
            if ranked.empty:
                raise ConfigError(
                    f"the sweep has no rows for method {args.rank_method!r} and metric {metric!r}"
                    "; pick another --rank-method or give --heads"
                )
            heads = [(int(r.layer), int(r.head)) for r in ranked.head(args.top_k).itertuples()]
        for ly, h in heads:
            prepared.layout.check_head(ly, h)
        done = run_dir.done_parts()
        for method in methods:
            key = f"shift-{method.replace(':', '_')}"
            if key in done:
                continue
            if say:
                say(f"measuring {method} ablation of {len(heads)} heads")
            conds = conditions(heads, [method], each=args.each)
            part = shift(
                prepared.model, prepared.eval, conds, stats=stats, batch_size=args.batch_size,
                skip_first=args.skip_first, layout=prepared.layout,
            )  # fmt: skip
            run_dir.save_part(key, part)
    except KeyboardInterrupt:
        run_dir.set_status("interrupted")
        raise
    table = load_parts(run_dir, "shift-")
    run_dir.save_table("results.parquet", table)
    run_dir.save_figure("shift.png", shift_figure(table))
    run_dir.set_status("complete", heads=[list(h) for h in heads])
    _print(table)
    print(f"\nrun directory: {run_dir.path}")
    return 0


def _print(table) -> None:
    target = table[table["n_heads"] == table["n_heads"].max()]["target"].iloc[0]
    sub = table[table["target"] == target]
    print(f"ablating {target}: largest norm ratio, largest beyond-3sd fraction, output KL")
    for method, g in sub.groupby("method", sort=False):
        nr = g[g["metric"] == "norm_ratio"]["value"]
        b3 = g[g["metric"] == "frac_3sigma"]["value"]
        kl = g[g["metric"] == "kl"]["value"].iloc[0]
        far = nr.iloc[(nr - 1).abs().argmax()]
        print(f"  {method:>9}: norm ratio {far:.3f}  beyond 3sd {b3.max():.4f}  KL {kl:.4f}")
