"""One run's directory, :class:`RunDir`: open or resume it under its lock, verify what resume
trusts, and write parts, tables, tensors, tokens and figures atomically with their checksums
recorded in the manifest (see :mod:`headlab.runs` for the guarantees)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from headlab.batch import Batch
from headlab.errors import ConfigError
from headlab.runs.files import (
    MISSING,
    _checksum,
    _damage,
    _disk_errors,
    _is_temporary,
    _unreadable,
    atomic_path,
)
from headlab.runs.lock import _Lock
from headlab.runs.manifest import (
    FILES,
    FINAL_STATUSES,
    MANIFEST,
    _diff,
    library_versions,
    read_manifest,
)


class RunDir:
    """One run's directory. Create with :meth:`open`; release with :meth:`close` (or ``with``)."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = Path(path)
        self.manifest = manifest
        #: ``(relative path, reason)`` of every file resume found damaged and removed
        self.dropped: list[tuple[str, str]] = []
        self._lock: _Lock | None = None
        self._say: Callable[[str], None] | None = None
        self._mutex = threading.RLock()

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        kind: str,
        identity: dict[str, Any],
        command: list[str] | None = None,
        force: bool = False,
        on_status: Callable[[str], None] | None = None,
    ) -> RunDir:
        """Open ``path`` for a run of ``kind`` with ``identity``; resume if it holds the same run.

        Takes the directory's lock until :meth:`close` (or a final :meth:`set_status`). On resume,
        damaged or missing results are removed and reported through ``on_status`` (default: a
        warning) so the job recomputes them.

        Raises:
            ConfigError: the directory holds a different run (or other files) and not ``force``;
                another process is writing it; its manifest is damaged; it cannot be written.
        """
        path = Path(path)
        ident = json.loads(json.dumps(identity, sort_keys=True, default=str))
        if path.exists() and not path.is_dir():
            raise ConfigError(f"--out {path} is a file; give a directory path")
        lock = _Lock(path)
        lock.acquire()
        try:
            run = cls._open_locked(path, kind, ident, command, force, on_status)
        except BaseException:
            lock.release()
            raise
        run._lock = lock
        return run

    @classmethod
    def _open_locked(
        cls,
        path: Path,
        kind: str,
        ident: dict[str, Any],
        command: list[str] | None,
        force: bool,
        on_status: Callable[[str], None] | None,
    ) -> RunDir:
        if (path / MANIFEST).is_file():
            old = None if force else read_manifest(path)
            if old is not None and old.get("kind") == kind and old.get("identity") == ident:
                run = cls(path, old)
                run._say = on_status
                with _disk_errors(path / MANIFEST, path):
                    (path / "parts").mkdir(exist_ok=True)
                    run._verify()
                run.manifest["resumed"] = int(old.get("resumed", 0)) + 1
                run.manifest["status"] = "running"
                run.write_manifest()
                return run
            if old is not None:
                diff = _diff(old.get("identity", {}), ident)
                raise ConfigError(
                    f"{path} holds a different {old.get('kind', '?')} run ({diff}); choose another "
                    "--out directory, or pass --force to overwrite it"
                )
            with _disk_errors(path, path):
                shutil.rmtree(path)
        elif path.is_dir() and any(path.iterdir()):
            if not force:
                raise ConfigError(
                    f"{path} exists and is not an empty headlab run directory; choose another "
                    "--out directory, or pass --force to overwrite it"
                )
            with _disk_errors(path, path):
                shutil.rmtree(path)
        with _disk_errors(path / "parts", path):
            (path / "parts").mkdir(parents=True, exist_ok=True)
        manifest = {
            "kind": kind,
            "identity": ident,
            "command": command if command is not None else sys.argv,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "versions": library_versions(),
            "status": "running",
            "resumed": 0,
            FILES: {},
        }
        run = cls(path, manifest)
        run._say = on_status
        run.write_manifest()
        return run

    # -- the lock ------------------------------------------------------------------------------
    def close(self) -> None:
        """Release the directory to other writers (idempotent; reading it stays possible)."""
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.release()

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        lock = getattr(self, "_lock", None)
        if lock is not None:
            with suppress(Exception):  # interpreter shutdown
                lock.release()

    # -- manifest --------------------------------------------------------------------------
    def write_manifest(self) -> None:
        with self._mutex:
            text = json.dumps(self.manifest, indent=2, sort_keys=True, default=str)
            with atomic_path(self.path / MANIFEST, run=self.path) as tmp:
                tmp.write_bytes(text.encode())

    def set_status(self, status: str, **extra: Any) -> None:
        """Record ``status`` (and ``extra`` keys); a final status releases the directory."""
        with self._mutex:
            self.manifest["status"] = status
            self.manifest.update(extra)
            self.write_manifest()
        if status in FINAL_STATUSES:
            self.close()

    @property
    def complete(self) -> bool:
        return self.manifest.get("status") == "complete"

    # -- writing -------------------------------------------------------------------------------
    @contextmanager
    def atomic(self, name: str) -> Iterator[Path]:
        """Yield a temporary path to write ``name`` (relative to the run directory) to; on success
        it replaces ``name`` atomically and the manifest records its checksum."""
        record: dict[str, Any] = {}
        with atomic_path(self.file(name), run=self.path, record=record) as tmp:
            yield tmp
        with self._mutex:
            self.manifest.setdefault(FILES, {})[Path(name).as_posix()] = record
            self.write_manifest()

    def _report(self, message: str, *, warn: bool = True) -> None:
        """Tell the job's ``on_status``; without one, damage is still worth a warning."""
        if self._say is not None:
            self._say(message)
        elif warn:
            warnings.warn(message, RuntimeWarning, stacklevel=4)

    # -- verification --------------------------------------------------------------------------
    def _verify(self) -> None:
        """Remove temporary leftovers and every damaged file (see :mod:`headlab.runs`)."""
        for folder in (self.path, self.path / "parts"):
            if folder.is_dir():
                for p in folder.iterdir():
                    if p.is_file() and _is_temporary(p.name):
                        p.unlink(missing_ok=True)
        files = self.manifest.get(FILES)
        if not isinstance(files, dict):  # written before checksums existed
            files = self.manifest[FILES] = {}
        for rel in sorted(files):
            reason = _damage(self.path / rel, files[rel])
            if reason is not None:
                self._drop(rel, reason)
        legacy = [*(self.path / "parts").glob("*.parquet"), *self.path.glob("*.safetensors")]
        for p in sorted(legacy):
            rel = p.relative_to(self.path).as_posix()
            if rel in files:
                continue
            reason = _unreadable(p)
            if reason is not None:
                self._drop(rel, reason)
            else:  # an older release's file, or one whose manifest entry a crash prevented
                files[rel] = _checksum(p)

    def _drop(self, rel: str, reason: str) -> None:
        (self.path / rel).unlink(missing_ok=True)
        self.manifest.get(FILES, {}).pop(rel, None)
        self.dropped.append((rel, reason))
        # a missing file was deleted on purpose (or by hand): no need to warn about it
        self._report(f"{_label(rel)} {reason}; recomputing", warn=reason != MISSING)

    def verified(self, name: str) -> Path | None:
        """``name``'s path if it exists and is intact; a damaged one is removed and reported, and
        ``None`` returned so the caller recomputes it."""
        path = self.file(name)
        if not path.is_file():
            return None
        rec = self.manifest.get(FILES, {}).get(Path(name).as_posix())
        reason = _damage(path, rec) if rec is not None else _unreadable(path)
        if reason is None:
            return path
        with self._mutex:
            self._drop(Path(name).as_posix(), reason)
            self.write_manifest()
        return None

    # -- parts -----------------------------------------------------------------------------
    def done_parts(self) -> set[str]:
        return {p.stem for p in (self.path / "parts").glob("*.parquet")}

    def save_part(self, key: str, table: pd.DataFrame) -> None:
        with self.atomic(f"parts/{key}.parquet") as tmp:
            table.to_parquet(tmp, index=False)

    def drop_part(self, key: str, reason: str) -> None:
        """Remove part ``key`` (reported with ``reason``) so the job recomputes it."""
        with self._mutex:
            self._drop(f"parts/{key}.parquet", reason)
            self.write_manifest()

    def read_part(self, key: str) -> pd.DataFrame:
        """Part ``key``, checked against its checksum.

        Raises:
            ConfigError: the part is missing or damaged (a damaged one is removed, so re-running
                the same command recomputes it).
        """
        rel = f"parts/{key}.parquet"
        path = self.verified(rel)
        if path is None:
            raise ConfigError(
                f"part {key} of {self.path} is missing or damaged; re-run the same command to "
                "recompute it"
            )
        try:
            return pd.read_parquet(path)
        except Exception as err:
            with self._mutex:
                self._drop(rel, f"is unreadable ({err})")
                self.write_manifest()
            raise ConfigError(
                f"part {key} of {self.path} is unreadable ({err}); it was removed: re-run the "
                "same command to recompute it"
            ) from None

    def load_parts(self, prefix: str = "") -> pd.DataFrame | None:
        """The parts whose keys start with ``prefix``, concatenated (None: no such part)."""
        keys = sorted(p.stem for p in (self.path / "parts").glob(f"{prefix}*.parquet"))
        if not keys:
            return None
        return pd.concat([self.read_part(k) for k in keys], ignore_index=True)

    # -- artefacts -------------------------------------------------------------------------
    def file(self, name: str) -> Path:
        return self.path / name

    def save_table(self, name: str, table: pd.DataFrame) -> Path:
        with self.atomic(name) as tmp:
            if name.endswith(".csv"):
                table.to_csv(tmp, index=False)
            else:
                table.to_parquet(tmp, index=False)
        return self.file(name)

    def save_tensors(
        self, name: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
    ) -> Path:
        """Write ``tensors`` to ``name`` as safetensors, atomically."""
        from safetensors.torch import save_file

        with self.atomic(name) as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        return self.file(name)

    def load_tensors(self, name: str) -> dict[str, torch.Tensor] | None:
        """The tensors of ``name`` (None: absent, or damaged, which is then removed and reported
        so the caller recomputes it)."""
        from safetensors.torch import load_file

        path = self.verified(name)
        return None if path is None else load_file(str(path))

    def save_tokens(self, batch: Batch, name: str = "tokens.safetensors") -> Path:
        """The evaluated inputs and loss masks, so anyone can recompute any number."""
        tensors = {k: v for k, v in vars(batch).items() if isinstance(v, torch.Tensor)}
        return self.save_tensors(name, tensors, metadata={"format": "headlab-tokens/1"})

    def load_tokens(self, name: str = "tokens.safetensors") -> Batch:
        from safetensors.torch import load_file

        path = self.file(name)
        if not path.is_file():
            raise ConfigError(f"no {name} in {self.path}")
        rec = self.manifest.get(FILES, {}).get(name)
        reason = _damage(path, rec) if rec is not None else _unreadable(path)
        if reason is not None:
            raise ConfigError(
                f"{path} {reason}; re-run the command that wrote {self.path} to rewrite it, or "
                "delete the file"
            )
        return Batch(**load_file(str(path)))

    def save_figure(self, name: str, fig: Any) -> Path:
        with self.atomic(name) as tmp:
            fig.savefig(tmp, dpi=110, bbox_inches="tight")
        return self.file(name)


def _label(rel: str) -> str:
    if rel.startswith("parts/") and rel.endswith(".parquet"):
        return f"part {rel[len('parts/') : -len('.parquet')]}"
    return rel
