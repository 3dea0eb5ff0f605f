"""Run directories as the atlas reads them: read-only, without taking their lock.

:func:`open_runs` checks what it is given (a run directory each, all of one model) and returns one
:class:`RunView` per directory. A view reads the final tables a job wrote; for a run that did not
finish (``status`` other than ``complete``) it also reads what its finished parts hold, so an
atlas of an interrupted sweep shows the layers that were done and says the run is unfinished.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from headlab.errors import ConfigError
from headlab.runs import MANIFEST, read_manifest

__all__ = ["RunView", "open_runs"]

#: sweep-shaped parts (``METHOD-L###``): a sweep's own, and the ``sweep-`` parts another job
#: (prune, shift) saves when it ranks heads itself
SWEEP_PART_COLUMNS = ("layer", "head", "method", "metric", "value", "baseline", "delta")


@dataclass
class RunView:
    """One run directory, read-only.

    Attributes:
        path: the directory.
        manifest: its ``manifest.json``.
        label: a short name unique among the runs of one atlas (the directory name).
        notes: what could not be read, in words (shown in the overview).
    """

    path: Path
    manifest: dict[str, Any]
    label: str
    notes: list[str] = field(default_factory=list)
    _tables: dict[str, pd.DataFrame | None] = field(default_factory=dict, repr=False)

    @property
    def kind(self) -> str:
        return str(self.manifest.get("kind", "?"))

    @property
    def status(self) -> str:
        return str(self.manifest.get("status", "?"))

    @property
    def complete(self) -> bool:
        return self.status == "complete"

    @property
    def identity(self) -> dict[str, Any]:
        ident = self.manifest.get("identity")
        return ident if isinstance(ident, dict) else {}

    @property
    def fingerprint(self) -> str | None:
        value = self.identity.get("model_fingerprint")
        return str(value) if value else None

    @property
    def command(self) -> str:
        """The command that wrote the run, as one shell line (re-running it resumes the run)."""
        cmd = self.manifest.get("command")
        if isinstance(cmd, list) and cmd:
            return shlex.join(str(c) for c in cmd)
        return ""

    def table(self, name: str) -> pd.DataFrame | None:
        """The table ``name`` (Parquet or CSV) of the run (None: absent or unreadable, noted)."""
        if name not in self._tables:
            self._tables[name] = self._read(self.path / name)
        return self._tables[name]

    def parts(self, prefix: str = "") -> pd.DataFrame | None:
        """The finished parts whose keys start with ``prefix``, concatenated (None: none)."""
        key = f"parts/{prefix}*"
        if key not in self._tables:
            files = sorted((self.path / "parts").glob(f"{prefix}*.parquet"))
            tables = [t for t in (self._read(f) for f in files) if t is not None and len(t)]
            self._tables[key] = pd.concat(tables, ignore_index=True) if tables else None
        return self._tables[key]

    def sweep_parts(self, prefix: str = "") -> pd.DataFrame | None:
        """The sweep-shaped parts with ``prefix`` (a sweep's own with ``""``, the ranking sweep of
        a prune or shift run with ``"sweep-"``), in the sweep's canonical order."""
        from headlab.analyses.sweep import tidy

        table = self.parts(prefix)
        if table is None or not set(SWEEP_PART_COLUMNS) <= set(table.columns):
            return None
        return tidy(table)

    def file(self, name: str) -> Path | None:
        path = self.path / name
        return path if path.is_file() else None

    def _read(self, path: Path) -> pd.DataFrame | None:
        if not path.is_file():
            return None
        try:
            if path.suffix == ".csv":
                return pd.read_csv(path)
            return pd.read_parquet(path)
        except Exception as err:  # damaged or half-written: the atlas shows the rest
            self.notes.append(f"{path.relative_to(self.path)} could not be read ({err})")
            return None


def open_runs(paths: Sequence[str | os.PathLike[str]]) -> list[RunView]:
    """One :class:`RunView` per run directory of ``paths`` (repeats dropped).

    Raises:
        ConfigError: no path; a path that does not exist, is a file, is empty or holds no
            ``manifest.json``; runs of different models (both fingerprints named).
    """
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    if not paths:
        raise ConfigError("give at least one run directory (the --out of a headlab command)")
    views: list[RunView] = []
    seen: set[Path] = set()
    for p in paths:
        path = Path(p)
        real = path.resolve()
        if real in seen:
            continue
        seen.add(real)
        views.append(RunView(path, _manifest(path), label=""))
    _check_one_model(views)
    _label(views)
    return views


def _manifest(path: Path) -> dict[str, Any]:
    fix = "give the --out directory of a headlab command (e.g. runs/demo)"
    if not path.exists():
        raise ConfigError(f"{path} does not exist; {fix}")
    if not path.is_dir():
        raise ConfigError(f"{path} is a file, not a run directory; {fix}")
    if not any(path.iterdir()):
        raise ConfigError(f"{path} is empty: not a headlab run directory; {fix}")
    if not (path / MANIFEST).is_file():
        raise ConfigError(f"{path} is not a headlab run directory (no {MANIFEST}); {fix}")
    manifest = read_manifest(path)
    if "kind" not in manifest:
        raise ConfigError(f"{path / MANIFEST} names no kind of run; {fix}")
    return manifest


def _check_one_model(views: list[RunView]) -> None:
    first = views[0]
    for view in views[1:]:
        a, b = first.fingerprint, view.fingerprint
        if a is None or b is None:
            lacking = first if a is None else view
            raise ConfigError(
                f"{lacking.path} records no model fingerprint, so it cannot be shown beside other "
                "runs; report it on its own"
            )
        if a != b:
            raise ConfigError(
                f"{first.path} and {view.path} are runs of different models (fingerprints "
                f"{a[:16]} and {b[:16]}); an atlas shows one model: report them separately"
            )


def _label(views: list[RunView]) -> None:
    """Each view's label: its directory name, with its parent's name where two names clash."""
    names = [v.path.resolve().name or str(v.path) for v in views]
    for view, name in zip(views, names, strict=True):
        clash = names.count(name) > 1
        view.label = f"{view.path.resolve().parent.name}/{name}" if clash else name
    seen: dict[str, int] = {}
    for view in views:  # still equal (same parent names): number them
        n = seen[view.label] = seen.get(view.label, 0) + 1
        if n > 1:
            view.label = f"{view.label} ({n})"
