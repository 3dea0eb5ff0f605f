"""Run directories: a manifest, results written part by part, and resumption.

A run directory holds ``manifest.json`` (command, identity of the run, library versions, status,
and under ``files`` the sha256 and size of every file headlab wrote there), ``parts/`` (one Parquet
file per finished unit of work), and the final artefacts. Re-running the same command finds the same
*identity* and skips finished parts; a directory holding a different run is refused unless
``force``.

Three guarantees:

* **Every write is atomic**: a temporary file beside the target, flushed and ``fsync``-ed, then
  ``os.replace``-d over it, then the directory ``fsync``-ed (:func:`atomic_path`). A crash leaves
  the old file or the new one, never half of one; a full disk or a read-only ``--out`` becomes a
  :class:`~headlab.errors.ConfigError` that says what to do, and the temporary file is removed.
* **Resume verifies what it trusts**: on resume every file the manifest records is checked against
  its size and sha256; parts and tensors written before checksums existed must at least be readable
  (a Parquet footer, a safetensors header). What fails is removed, reported through ``on_status``
  ("part X failed its checksum; recomputing") and listed in :attr:`RunDir.dropped`, so the job
  recomputes it.
* **One writer at a time**: :meth:`RunDir.open` takes an exclusive ``flock`` on ``<out>.lock``, a
  file *beside* the run directory, before it reads the manifest, and holds it until the job finishes
  (:meth:`RunDir.close`, ``with``, or the final :meth:`RunDir.set_status`). The lock file lives
  outside the directory so that ``--force`` (which deletes the directory) and two commands creating
  the directory at the same moment are still serialised by one lock file; it is deleted on release
  (while still locked, and a taker re-checks the inode it locked, so the deletion never lets two
  writers in). The kernel drops the lock when its process dies, so a stale lock file is simply taken
  over; the pid, host and time written inside it only serve the message to a second writer.
"""

from __future__ import annotations

import atexit
import errno
import hashlib
import json
import os
import platform
import secrets
import shutil
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from headlab.batch import Batch
from headlab.errors import ConfigError

__all__ = ["RunDir", "atomic_path", "library_versions", "read_manifest"]

MANIFEST = "manifest.json"
#: manifest key: ``{relative path: {"sha256": hex, "size": bytes}}`` of every file headlab wrote
FILES = "files"
#: statuses after which the job writes nothing more; setting one releases the directory
FINAL_STATUSES = ("complete", "interrupted")
MISSING = "is missing"


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("headlab", "torch", "transformers", "numpy", "pandas", "safetensors"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


# -- errors a write can meet -----------------------------------------------------------------
def _errno_of(err: BaseException) -> int | None:
    """The errno of ``err``, also when a library (pyarrow, safetensors) only put it in the text."""
    if isinstance(err, OSError) and err.errno is not None:
        return err.errno
    text = str(err)
    for code, words in (
        (errno.ENOSPC, ("No space left on device", "os error 28")),
        (errno.EDQUOT, ("Disk quota exceeded", "os error 122")),
        (errno.EACCES, ("Permission denied", "os error 13")),
        (errno.EROFS, ("Read-only file system", "os error 30")),
    ):
        if any(w in text for w in words):
            return code
    return None


def _write_error(err: BaseException, target: Path, run: Path) -> ConfigError | None:
    """The ConfigError a user should see for ``err`` while writing ``target`` (None: not an
    error of the disk or its permissions)."""
    code = _errno_of(err)
    if code in (errno.ENOSPC, errno.EDQUOT):
        what = "disk full" if code == errno.ENOSPC else "disk quota exceeded"
        return ConfigError(
            f"{what} while writing {target}; free space and re-run the same command to resume"
        )
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        why = "read-only file system" if code == errno.EROFS else "permission denied"
        return ConfigError(f"cannot write to {run} ({why}); choose a writable --out")
    if isinstance(err, OSError):
        return ConfigError(
            f"could not write {target} ({err.strerror or err}); check that --out is a writable "
            "directory, then re-run the same command to resume"
        )
    return None


@contextmanager
def _disk_errors(target: Path, run: Path) -> Iterator[None]:
    """Turn a full disk or a denied write inside the block into a ConfigError."""
    try:
        yield
    except Exception as err:
        clear = _write_error(err, target, run)
        if clear is None:
            raise
        raise clear from err


# -- atomic writes ---------------------------------------------------------------------------
def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot sync a directory; the replace is still atomic
        pass
    finally:
        os.close(fd)


def _checksum(path: Path, *, sync: bool = False) -> dict[str, Any]:
    """``{"sha256", "size"}`` of ``path`` (read once); with ``sync``, ``fsync`` it too."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
        if sync:
            os.fsync(f.fileno())
    return {"sha256": digest.hexdigest(), "size": size}


def _is_temporary(name: str) -> bool:
    return (name.startswith(".") and ".tmp" in name) or name.endswith(".tmp")


@contextmanager
def atomic_path(
    target: str | os.PathLike[str],
    *,
    run: str | os.PathLike[str] | None = None,
    record: dict[str, Any] | None = None,
) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; when the block succeeds, ``fsync`` it, replace
    ``target`` with it and ``fsync`` the directory. On any error the temporary file (and whatever a
    writer left beside it) is removed; a full disk or a denied write becomes a ConfigError naming
    ``target`` (and ``run``, the directory to name, default ``target``'s folder).

    With ``record`` (a dict), the new file's ``{"sha256", "size"}`` is stored in it.
    """
    target = Path(target)
    run = Path(run) if run is not None else target.parent
    # keep the suffix: matplotlib picks the format from it
    tag = f"{os.getpid()}.{secrets.token_hex(3)}"
    tmp = target.with_name(f".{target.stem}.{tag}.tmp{target.suffix}")
    try:
        with _disk_errors(target, run):
            yield tmp
            sealed = _checksum(tmp, sync=True)
            os.replace(tmp, target)
    except BaseException:
        with suppress(OSError):
            for leftover in target.parent.iterdir():
                if leftover.name.startswith(tmp.name):
                    leftover.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)
    if record is not None:
        record.update(sealed)


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of the run directory ``path``.

    Raises:
        ConfigError: ``manifest.json`` is missing or damaged (not a JSON object).
    """
    mpath = Path(path) / MANIFEST
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path} is not a headlab run directory (no {MANIFEST})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(
            f"{mpath} is damaged ({err}); pass --force to start over, or restore it"
        ) from None
    if not isinstance(manifest, dict):
        raise ConfigError(
            f"{mpath} is damaged (not a JSON object); pass --force to start over, or restore it"
        )
    return manifest


# -- the lock --------------------------------------------------------------------------------
try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks; one writer is on the user
    fcntl = None  # type: ignore[assignment]

#: locks this process holds, by lock-file path
_HELD: dict[str, _Lock] = {}
_HELD_GUARD = threading.Lock()


class _Lock:
    """An exclusive ``flock`` on ``<run>.lock`` (see the module docstring)."""

    def __init__(self, run: Path) -> None:
        real = run.resolve()
        if not real.name:
            raise ConfigError(f"--out {run} is a file-system root; give a directory below it")
        self.run = run
        self.path = real.with_name(real.name + ".lock")
        self.fd: int | None = None
        self.pid = os.getpid()
        self.thread = threading.get_ident()

    def acquire(self) -> None:
        if fcntl is None:  # pragma: no cover
            return
        with _disk_errors(self.path, self.run):
            self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(100):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as err:
                if isinstance(err, PermissionError) or err.errno == errno.EROFS:
                    raise ConfigError(
                        f"cannot write to {self.run} (permission denied creating its lock file "
                        f"{self.path}); choose a writable --out"
                    ) from err
                raise _write_error(err, self.path, self.run) or err from err
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                info = _read_info(fd)
                os.close(fd)
                if self._take_over_own():
                    continue
                raise ConfigError(_in_use(self.run, info)) from None
            # the file we locked must still be the one at the path (a holder deletes it on release)
            try:
                same = os.path.samestat(os.stat(self.path), os.fstat(fd))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            info = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "command": sys.argv,
            }
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(info, default=str).encode(), 0)
            except OSError:
                pass  # the lock holds without its description
            self.fd = fd
            with _HELD_GUARD:
                _HELD[str(self.path)] = self
            return
        raise ConfigError(f"could not lock {self.path}; try again")  # pragma: no cover

    def _take_over_own(self) -> bool:
        """Release a lock this very thread holds for an earlier job that never closed its run
        directory (it raised, and its traceback keeps the RunDir alive); True if one was."""
        with _HELD_GUARD:
            old = _HELD.get(str(self.path))
        if old is None or old.thread != threading.get_ident() or old.pid != os.getpid():
            return False
        old.release()
        return True

    def release(self) -> None:
        fd, self.fd = self.fd, None
        if fd is None or self.pid != os.getpid():  # a forked child never releases its parent's
            return
        with _HELD_GUARD:
            if _HELD.get(str(self.path)) is self:
                del _HELD[str(self.path)]
        try:
            if os.path.samestat(os.stat(self.path), os.fstat(fd)):
                os.unlink(self.path)  # while still locked: see acquire()
        except OSError:
            pass
        os.close(fd)


def _read_info(fd: int) -> dict[str, Any]:
    """What the holder wrote in the lock file (it may not have written it yet)."""
    for _ in range(20):
        try:
            data = os.pread(fd, 4096, 0)
            if data:
                return json.loads(data)
        except (OSError, ValueError):
            pass
        time.sleep(0.01)
    return {}


def _in_use(run: Path, info: dict[str, Any]) -> str:
    if info.get("pid") == os.getpid() and info.get("host") == socket.gethostname():
        who = f"this process ({info['pid']}, another thread)"
    elif "pid" in info:
        who = f"process {info['pid']} on {info.get('host', '?')}"
    else:
        who = "another process"
    since = f" since {info['since']}" if "since" in info else ""
    return f"{run} is in use by {who}{since}; wait, or pass a different --out"


@atexit.register
def _release_all() -> None:
    with _HELD_GUARD:
        held = list(_HELD.values())
    for lock in held:
        lock.release()


# -- the run directory -----------------------------------------------------------------------
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
        """Remove temporary leftovers and every damaged file (see the module docstring)."""
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


def _damage(path: Path, rec: Any) -> str | None:
    """Why ``path`` does not match its manifest record ``rec`` (None: it does)."""
    if not path.is_file():
        return MISSING
    if not isinstance(rec, dict) or "sha256" not in rec:
        return _unreadable(path)
    size = path.stat().st_size
    want = rec.get("size")
    if isinstance(want, int) and size != want:
        if size < want:
            return f"is truncated ({size} of {want} bytes)"
        return f"has the wrong size ({size} bytes, expected {want})"
    try:
        got = _checksum(path)["sha256"]
    except OSError as err:
        return f"is unreadable ({err.strerror or err})"
    return None if got == rec["sha256"] else "failed its checksum"


def _unreadable(path: Path) -> str | None:
    """Why a file without a checksum cannot be trusted (None: its format's header reads)."""
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            pq.ParquetFile(path).metadata  # noqa: B018 - reads and checks the footer
        elif path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                f.keys()
    except Exception as err:
        return f"is unreadable ({err})"
    return None


def _diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if not keys:
        return "different kind"
    shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys[:3])
    return shown + (" ..." if len(keys) > 3 else "")
