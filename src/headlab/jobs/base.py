"""The job skeleton every command uses.

A job opens (or resumes) its run directory, loads or collects the statistics its methods need,
lists its parts (:class:`headlab.parts.Part` values), runs the missing ones through an executor
(:mod:`headlab.jobs.executors`: in this process, or on Ray) with a progress bar, saves each as it
finishes (atomically, with its checksum in the manifest), and marks the run
``interrupted`` or ``complete``. Commands differ only in their parts and in what they write at the
end.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any

import pandas as pd

from headlab.errors import ConfigError
from headlab.errors import check_count as check_count
from headlab.jobs.executors import Executor, SerialExecutor
from headlab.parts import Context, Part
from headlab.runs import RunDir
from headlab.stats import Stats, StatsConfig, collect_stats

__all__ = [
    "Say",
    "execute",
    "job_stats",
    "load_parts",
    "needs_stats",
    "open_run",
    "progress_bar",
    "stats_config",
]

#: a status callback: one line per slow step (``None``: silent)
Say = Callable[[str], None] | None
#: how a job saves one part's output (default: a Parquet table under the part's key)
Save = Callable[[RunDir, Part, Any], None]


def progress_bar(enabled: bool, total: int, desc: str, unit: str = "ex") -> Any:
    """A tqdm bar on stderr (``None`` when disabled or when nothing is left to do)."""
    if not enabled or total <= 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr)


def command_line() -> list[str]:
    """The command as typed, for the manifest."""
    return ["headlab", *sys.argv[1:]]


@contextmanager
def open_run(
    out: str | os.PathLike[str],
    kind: str,
    identity: dict[str, Any],
    *,
    tokens: Any = None,
    command: list[str] | None = None,
    force: bool = False,
    on_status: Say = None,
) -> Iterator[RunDir]:
    """Open or resume the run directory ``out`` for a ``kind`` run of ``identity``, holding its
    lock for the ``with`` block; saves ``tokens`` (the evaluated batch) once; marks the run
    ``interrupted`` on Ctrl-C and always releases the lock."""
    run = RunDir.open(
        out, kind=kind, identity=identity, command=command, force=force, on_status=on_status
    )
    try:
        if tokens is not None and run.verified("tokens.safetensors") is None:
            run.save_tokens(tokens)
        yield run
    except KeyboardInterrupt:
        run.set_status("interrupted")
        raise
    finally:
        run.close()


def needs_stats(methods: Iterable[Any]) -> bool:
    """Whether any of ``methods`` (names such as ``mean``, ``atp:peak``, ``ig:mean:2``,
    ``exact:zero``, ``ablation:mean``, or Intervention values) reads activation statistics."""
    from headlab.interventions import Intervention, intervention_from_name

    for m in methods:
        if isinstance(m, Intervention):
            if m.needs:
                return True
            continue
        name = str(m)
        if name.startswith("ig:"):  # ig:METHOD[:STEPS]
            from headlab.analyses.estimate.ig import parse_ig

            name = parse_ig(name)[0]
        while ":" in name and name.split(":", 1)[0] in ("atp", "exact", "ablation"):
            name = name.split(":", 1)[1]
        if name in ("patch", "gradient", "rollout", "attention"):
            continue
        if intervention_from_name(name).needs:
            return True
    return False


def stats_config(bins: int, reservoir: int, seed: int, stats_batch: Any) -> StatsConfig:
    """The statistics settings of a run (the reservoir never exceeds the statistics inputs)."""
    check_count("--bins", bins)
    check_count("--reservoir", reservoir, low=0)
    return StatsConfig(bins=bins, reservoir=min(reservoir, len(stats_batch)), seed=seed)


def job_stats(
    run: RunDir,
    prepared: Any,
    config: StatsConfig,
    *,
    batch_size: int,
    progress: bool = False,
    on_status: Say = None,
) -> Stats:
    """The run's activation statistics: read from ``stats.safetensors`` when it is intact, else
    collected on the statistics batch and saved. A peak or median later read from them while too
    thin is reported once to ``on_status`` (see :mod:`headlab.stats.thin`)."""
    path = run.verified("stats.safetensors")
    if path is not None:
        stats = Stats.load(path, model=prepared.model)
        stats.say = on_status
        return stats
    if on_status:
        on_status(f"collecting statistics on {len(prepared.stats_batch)} inputs")
    stats = collect_stats(
        prepared.model, prepared.stats_batch, config=config, batch_size=batch_size,
        progress=progress,
    )  # fmt: skip
    with run.atomic("stats.safetensors") as tmp:
        stats.save(tmp)
    stats.say = on_status
    return stats


def _save_table(run: RunDir, part: Part, output: Any) -> None:
    run.save_part(part.key, output)


def execute(
    run: RunDir,
    parts: Sequence[Part],
    ctx: Context,
    *,
    progress: bool = False,
    desc: str = "parts",
    unit: str = "ex",
    done: Callable[[Part], bool] | None = None,
    save: Save = _save_table,
    on_done: Callable[[Part, Any], None] | None = None,
    executor: Executor | None = None,
) -> list[Part]:
    """Run the parts of ``parts`` that are not done yet, saving each as it finishes.

    Args:
        run: the open run directory.
        parts: every part of the job (finished ones are skipped).
        ctx: what the parts read.
        done: whether a part is finished (default: its key is among the run's intact parts).
        save: how a part's output is saved (default: ``run.save_part(key, table)``).
        on_done: called after each part is saved (e.g. a status line).
        executor: where the parts run (default: in this process, in order); an executor that
            runs them elsewhere hands back each output as it finishes, in any order, and this
            driver saves it then (so the run directory is the same whichever executor ran it).

    Returns:
        The parts that ran.
    """
    keys = {p.key for p in parts}
    if len(keys) != len(parts):
        raise ConfigError("a job listed two parts with the same key")  # a bug, not user input
    finished = run.done_parts()
    todo = [p for p in parts if not (done(p) if done is not None else p.key in finished)]
    bar = progress_bar(progress, sum(p.cost(ctx) for p in todo), desc, unit)
    runner = executor if executor is not None else SerialExecutor()
    try:
        for part, output in runner.run(todo, ctx, bar.update if bar is not None else None):
            save(run, part, output)
            if on_done is not None:
                on_done(part, output)
    finally:
        if bar is not None:
            bar.close()
    return todo


def load_parts(run: RunDir, prefix: str = "") -> pd.DataFrame:
    """The concatenated (checksum-verified) parts of ``run`` whose keys start with ``prefix``."""
    table = run.load_parts(prefix)
    if table is None:
        raise ConfigError(f"run directory {run.path} has no {prefix}* parts")
    return table


def identity_of(prepared: Any, **options: Any) -> dict[str, Any]:
    """A run's identity: what it ran on (``prepared.identity()``) plus the job's options
    (dataclass values become dicts)."""
    extra = {k: asdict(v) if hasattr(v, "__dataclass_fields__") else v for k, v in options.items()}
    config = extra.get("stats_config")
    if isinstance(config, dict) and "methods" in options and not _reads_peak(options["methods"]):
        # what `peak` reads matters only to a job that ablates with it; left out otherwise, so
        # run directories from before the setting existed still resume
        config.pop("peak_estimator", None)
    return {**prepared.identity(), **extra}


def _reads_peak(methods: Iterable[Any]) -> bool:
    """Whether any of ``methods`` (names or Intervention values) is a peak ablation."""
    for m in methods:
        name = str(getattr(m, "label", m))
        while ":" in name and name.split(":", 1)[0] in ("atp", "exact", "ablation", "ig"):
            name = name.split(":", 1)[1]
        if name.startswith("peak"):
            return True
    return False
