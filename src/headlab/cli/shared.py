"""Job helpers that several commands share: opening a run directory for prepared inputs,
statistics kept in the run directory, and a sweep either read from an earlier ``headlab sweep`` run
(checked to be on the same model and data) or computed and saved part by part."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from headlab.cli.common import csv_list, data_kwargs, non_negative_int, positive_int
from headlab.cli.common import status as status_printer
from headlab.errors import ConfigError
from headlab.jobs import Inputs, Prepared, prepare
from headlab.runs import RunDir, read_manifest
from headlab.stats import Stats, StatsConfig, collect_stats


def prepared_inputs(args: argparse.Namespace, **overrides: Any) -> Prepared:
    """Load the model and data named by the shared CLI options."""
    kw = {**data_kwargs(args), **overrides}
    return prepare(Inputs(**kw), on_status=status_printer(args))


def open_run(
    args: argparse.Namespace, kind: str, prepared: Prepared, extra: dict[str, Any]
) -> RunDir:
    """Open (or resume) ``args.out`` for a ``kind`` run of ``prepared`` with options ``extra``."""
    identity = {**prepared.identity(), **extra}
    run = RunDir.open(
        args.out, kind=kind, identity=identity, command=["headlab", *sys.argv[1:]],
        force=args.force, on_status=status_printer(args),
    )  # fmt: skip
    if not run.file("tokens.safetensors").is_file():
        run.save_tokens(prepared.eval)
    return run


def run_stats(
    run: RunDir,
    prepared: Prepared,
    *,
    bins: int,
    reservoir: int,
    seed: int,
    batch_size: int,
    on_status: Callable[[str], None] | None = None,
) -> Stats:
    """The run's activation statistics: loaded from the run directory, else collected and saved."""
    path = run.verified("stats.safetensors")
    if path is not None:
        return Stats.load(path, model=prepared.model)
    if on_status:
        on_status(f"collecting statistics on {len(prepared.stats_batch)} inputs")
    config = StatsConfig(bins=bins, reservoir=min(reservoir, len(prepared.stats_batch)), seed=seed)
    stats = collect_stats(
        prepared.model, prepared.stats_batch, config=config, batch_size=batch_size
    )
    with run.atomic("stats.safetensors") as tmp:
        stats.save(tmp)
    return stats


def load_sweep(path: str | Path, prepared: Prepared) -> tuple[pd.DataFrame, bool]:
    """The table of a finished ``headlab sweep`` run directory and whether it was measured on
    exactly this command's evaluation blocks (``False``: other blocks of the same data, i.e. a
    held-out ranking). Refused unless it was run on this model and the same data (corpus or task,
    text field and block length)."""
    folder = Path(path)
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file() or not (folder / "results.parquet").is_file():
        raise ConfigError(
            f"--sweep {folder} is not a finished headlab sweep run directory (no manifest.json "
            "and results.parquet); run `headlab sweep --out DIR` first or omit --sweep"
        )
    manifest = read_manifest(folder)
    if manifest.get("kind") != "sweep":
        raise ConfigError(f"--sweep {folder} holds a {manifest.get('kind')!r} run, not a sweep")
    theirs, mine = manifest.get("identity", {}), prepared.identity()
    if theirs.get("model_fingerprint") != mine["model_fingerprint"]:
        raise ConfigError(
            f"--sweep {folder} was run on a different model than this command; sweep this "
            "--model (or omit --sweep to compute a sweep here)"
        )
    for key in ("data", "task", "text_field", "seq_len"):
        if theirs.get(key) != mine.get(key):
            raise ConfigError(
                f"--sweep {folder} was run on different data ({key}: {theirs.get(key)!r}, here "
                f"{mine.get(key)!r}); sweep the same --data/--task and --seq-len, or omit --sweep"
            )
    same = theirs.get("eval_fingerprint") == mine["eval_fingerprint"]
    try:
        return pd.read_parquet(folder / "results.parquet"), same
    except Exception as err:
        raise ConfigError(
            f"{folder / 'results.parquet'} is damaged ({err}); re-run that sweep to rewrite it "
            "(delete the file, then the same `headlab sweep` command), or omit --sweep"
        ) from None


def saved_sweep(
    run: RunDir,
    prepared: Prepared,
    *,
    methods: Sequence[str],
    metrics: Sequence[str],
    stats: Stats,
    batch_size: int,
) -> pd.DataFrame:
    """A single-head sweep computed inside ``run`` (parts ``sweep-*``, resumable)."""
    from headlab.analyses.sweep import sweep_parts, tidy

    done = {k[len("sweep-") :] for k in run.done_parts() if k.startswith("sweep-")}
    for part in sweep_parts(
        prepared.model,
        prepared.eval,
        methods=list(methods),
        metrics=list(metrics),
        stats=stats,
        batch_size=batch_size,
        skip=done,
        layout=prepared.layout,
    ):
        run.save_part(f"sweep-{part.key}", part.table)
    return tidy(load_parts(run, "sweep-"))


def load_parts(run: RunDir, prefix: str) -> pd.DataFrame:
    """The concatenated parts of ``run`` whose keys start with ``prefix``."""
    table = run.load_parts(prefix)  # each part checked against its checksum
    if table is None:
        raise ConfigError(f"run directory {run.path} has no {prefix}* parts")
    return table


def float_list(text: str) -> list[float]:
    try:
        return [float(t) for t in csv_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


def int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in csv_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def add_stats_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("statistics")
    g.add_argument(
        "--bins", type=positive_int("--bins"), default=1000, help="histogram bins for peak"
    )
    g.add_argument(
        "--reservoir",
        type=non_negative_int("--reservoir"),
        default=16,
        help="donor inputs for resample",
    )


def off_target_targets(
    args: argparse.Namespace, prepared: Prepared, say: Callable[[str], None] | None
) -> dict[str, tuple]:
    """Targets of ``--off-target``: built-in tasks (their own metric) and corpora (CE), each as
    ``{name: (batch, metric)}``; ``auto`` = every other built-in task plus python-docs."""
    from headlab.data.blocks import make_blocks
    from headlab.data.corpora import load_texts
    from headlab.data.tasks import TASKS, load_task

    spec = args.off_target.strip()
    if spec == "none":
        return {}
    auto = spec == "auto"
    names = [t for t in TASKS if t != args.task] + ["python-docs"] if auto else csv_list(spec)
    out: dict[str, tuple] = {}
    n = args.n_blocks
    for name in names:
        try:
            if name in TASKS:
                task = load_task(name, prepared.tokenizer, n=n, seed=args.seed)
                out[name] = (task.eval, task.metric)
            else:
                batch, _ = make_blocks(
                    prepared.tokenizer, load_texts(name), seq_len=args.seq_len or 64, n_blocks=n,
                    seed=args.seed + 7,
                )  # fmt: skip
                out[name] = (batch, "ce")
        except ConfigError as err:
            if not auto:
                raise
            if say:
                say(f"off-target: skipping {name} ({err})")
    return out
