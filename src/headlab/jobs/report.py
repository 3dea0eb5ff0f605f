"""The ``headlab report`` job: the head atlas of one or more run directories of one model, one
self-contained HTML file (see :mod:`headlab.atlas`)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from headlab.atlas import build_atlas, write_atlas

__all__ = ["ReportResult", "run_report"]


@dataclass
class ReportResult:
    """What :func:`run_report` wrote."""

    path: Path
    size: int
    runs: list[str]
    n_layers: int
    n_heads: int
    unfinished: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def run_report(
    runs: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
    *,
    out: str | os.PathLike[str] | None = None,
    model: bool = True,
    on_status: Callable[[str], None] | None = None,
) -> ReportResult:
    """Write the head atlas of ``runs`` to ``out`` (default: ``atlas.html`` in the first run
    directory); mirrors ``headlab report``.

    Raises:
        ConfigError: a path that is not a run directory; runs of different models; ``out`` not
            writable.
    """
    atlas = build_atlas(runs, model=model, on_status=on_status)
    target = Path(out) if out is not None else atlas.runs[0].path / "atlas.html"
    path = write_atlas(atlas, target)
    notes = list(atlas.model_notes) + [f"{r.label}: {n}" for r in atlas.runs for n in r.notes]
    return ReportResult(
        path, path.stat().st_size, [r.label for r in atlas.runs], atlas.n_layers, atlas.n_heads,
        [r.label for r in atlas.runs if not r.complete], notes,
    )  # fmt: skip
