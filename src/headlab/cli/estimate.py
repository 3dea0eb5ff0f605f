"""``headlab estimate``: cheap importance estimates for every head, optionally checked by exact
ablation of the top heads plus a random sample (``--exact-top``)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import pandas as pd

from headlab.cli.common import (
    add_data_args,
    add_model_args,
    add_run_args,
    csv_list,
    non_negative_int,
    positive_int,
    status,
)

NAME = "estimate"
HELP = (
    "Estimate every head's importance at once: attribution patching (atp:zero, atp:mean, "
    "atp:peak, atp:patch ...), Michel gradient importance, attention rollout; --exact-top K "
    "checks the estimate against exact ablation and reports the rank correlation."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    add_data_args(p)
    g = p.add_argument_group("estimate")
    g.add_argument(
        "--method",
        default="atp:zero,gradient,rollout",
        help="comma-separated: atp:zero, atp:mean, atp:median, atp:peak, atp:resample, "
        "atp:scale:ALPHA, atp:patch (counterfactual: the statistics split), gradient, rollout",
    )
    g.add_argument(
        "--metric",
        default=None,
        help="a metric with a gradient: ce, logit_diff, answer_logprob (default: ce for "
        "corpora, the task's own metric for tasks)",
    )
    g.add_argument(
        "--exact-top",
        type=non_negative_int("--exact-top"),
        default=0,
        metavar="K",
        help="also ablate the K heads with the largest estimates exactly (plus --n-random "
        "others) and report the Spearman correlation of estimate and exact effect",
    )
    g.add_argument(
        "--n-random",
        type=non_negative_int("--n-random"),
        default=10,
        help="random heads checked exactly",
    )
    g.add_argument(
        "--rollout-sources",
        default="context",
        choices=["context", "previous"],
        help="rollout: mass routed from the target position to positions 1..t-1 or to t-1",
    )
    g.add_argument(
        "--bins", type=positive_int("--bins"), default=1000, help="histogram bins for atp:peak"
    )
    add_run_args(p)
    p.add_argument("--top", type=positive_int("--top"), default=5, help="heads to print per method")


@dataclass
class EstimateResult:
    """What :func:`run_estimate` produced: the estimates, the exact check (if asked) and where
    they were written."""

    table: pd.DataFrame
    exact: pd.DataFrame | None
    correlation: pd.DataFrame | None
    run_dir: Any


def _needs_stats(methods: Sequence[str]) -> bool:
    from headlab.interventions import intervention_from_name

    for m in methods:
        rest = m.partition(":")[2]
        if m.startswith("atp:") and rest != "patch" and intervention_from_name(rest).needs:
            return True
    return False


def run_estimate(
    *,
    out: str | os.PathLike[str],
    methods: Sequence[str],
    metrics: Sequence[str] | None = None,
    exact_top: int = 0,
    n_random: int = 10,
    rollout_sources: str = "context",
    bins: int = 1000,
    batch_size: int = 8,
    force: bool = False,
    on_status: Callable[[str], None] | None = None,
    command: list[str] | None = None,
    **inputs: Any,
) -> EstimateResult:
    """Load the model and data (``inputs``: the shared options of :class:`headlab.jobs.Inputs`),
    estimate every head, optionally check by exact ablation, and write a run directory."""
    from headlab.analyses.estimate import estimate
    from headlab.analyses.estimate_check import estimate_then_exact
    from headlab.analyses.sweep import rank_heads, tidy
    from headlab.errors import ConfigError
    from headlab.jobs import Inputs, prepare
    from headlab.runs import RunDir
    from headlab.stats import StatsConfig, collect_stats

    methods = list(methods)
    if not methods:
        raise ConfigError("give at least one --method")
    if exact_top < 0 or n_random < 0:
        raise ConfigError("--exact-top and --n-random must be >= 0")
    prepared = prepare(Inputs(**inputs), on_status=on_status)
    metric_names = list(metrics) if metrics else prepared.metrics
    batch, model = prepared.eval, prepared.model
    counterfactual = None
    if "atp:patch" in methods:
        if len(prepared.stats_batch) < len(batch) or prepared.stats_batch.seq_len != batch.seq_len:
            raise ConfigError(
                "atp:patch patches in the statistics split, which needs at least --n-blocks "
                f"inputs of the same length ({len(prepared.stats_batch)} x "
                f"{prepared.stats_batch.seq_len} for {len(batch)} x {batch.seq_len})"
            )
        counterfactual = prepared.stats_batch.slice(0, len(batch))
    config = StatsConfig(bins=bins, reservoir=min(16, len(prepared.stats_batch)))
    identity = {
        **prepared.identity(),
        "methods": methods,
        "metrics": metric_names,
        "exact_top": exact_top,
        "n_random": n_random,
        "rollout_sources": rollout_sources,
        "stats_config": asdict(config),
    }
    run = RunDir.open(
        out, kind="estimate", identity=identity, command=command, force=force, on_status=on_status
    )
    try:
        run.save_tokens(batch)
        stats = None
        if _needs_stats(methods):
            if on_status:
                on_status(f"collecting statistics on {len(prepared.stats_batch)} inputs")
            stats = collect_stats(model, prepared.stats_batch, config=config, batch_size=batch_size)
        common = {"stats": stats, "counterfactual": counterfactual, "batch_size": batch_size}
        if on_status:
            on_status(f"estimating {', '.join(methods)} for every head")
        table = estimate(
            model,
            batch,
            methods=methods,
            metrics=metric_names,
            rollout_sources=rollout_sources,
            layout=prepared.layout,
            **common,
        )
        exact, correlation = None, None
        if exact_top > 0:
            checks = []
            for method in methods:
                for metric in metric_names if method != "rollout" else metric_names[:1]:
                    if on_status:
                        on_status(f"{method}: exact ablation of {exact_top} + {n_random} heads")
                    checks.append(
                        estimate_then_exact(
                            model,
                            batch,
                            method=method,
                            metric=metric,
                            exact_top=exact_top,
                            n_random=n_random,
                            seed=prepared.inputs.seed,
                            layout=prepared.layout,
                            estimates=table,
                            **common,
                        )
                    )
            exact = pd.concat([c.exact for c in checks], ignore_index=True)
            exact = tidy(exact.drop_duplicates(["layer", "head", "method", "metric"]))
            correlation = pd.concat([c.correlation for c in checks], ignore_index=True)
            run.save_table("exact.parquet", exact)
            run.save_table("correlation.csv", correlation)
        run.save_table("estimates.parquet", table)
        run.save_table("ranking.csv", rank_heads(table))
        for name, fig in _figures(table).items():
            run.save_figure(name, fig)
        run.set_status("complete")
        return EstimateResult(table, exact, correlation, run)
    finally:
        run.close()


def _figures(table: pd.DataFrame) -> dict[str, Any]:
    from headlab.plots import heatmap

    out = {}
    for (method, metric), _ in table.groupby(["method", "metric"], sort=True):
        value = "delta" if method.startswith("atp:") else "value"
        title = f"{method}: estimated Δ{metric}" if value == "delta" else f"{method} ({metric})"
        name = f"heatmap_{method.replace(':', '_')}_{metric}.png"
        out[name] = heatmap(table, method=method, metric=metric, value=value, title=title)
    return out


def run(args: argparse.Namespace) -> int:
    from headlab.cli.common import data_kwargs

    result = run_estimate(
        out=args.out,
        methods=csv_list(args.method),
        metrics=csv_list(args.metric) if args.metric else None,
        exact_top=args.exact_top,
        n_random=args.n_random,
        rollout_sources=args.rollout_sources,
        bins=args.bins,
        batch_size=args.batch_size,
        force=args.force,
        on_status=status(args),
        command=["headlab", *sys.argv[1:]],
        **data_kwargs(args),
    )
    print_summary(result, args.top)
    return 0


def print_summary(result: EstimateResult, top: int) -> None:
    """Top heads per method and metric, the correlation check, and the run directory."""
    from headlab.analyses.sweep import rank_heads

    for (method, metric), g in rank_heads(result.table).groupby(["method", "metric"], sort=True):
        print(f"\n{method}, {metric}: top {top} heads")
        for r in g.head(top).itertuples():
            what = f"Δ{metric} ≈ {r.delta:+.4f}" if method.startswith("atp:") else f"{r.value:.4f}"
            print(f"  L{r.layer:>2}.H{r.head:<2}  {what}")
    if result.correlation is not None:
        print("\nestimate vs exact ablation (Spearman of |effect|):")
        for r in result.correlation.itertuples():
            print(
                f"  {r.method:<12} vs {r.exact_method} ablation, {r.exact_metric:<10} "
                f"all checked {r.spearman:+.3f} (n={r.n_checked}), "
                f"random sample {r.spearman_random:+.3f} (n={r.n_random})"
            )
    print(f"\nrun directory: {result.run_dir.path}")
