"""Files of a run directory: atomic writes, checksums, and the checks resume trusts.

- :func:`atomic_path`: a temporary file beside the target, flushed and ``fsync``-ed, then
  ``os.replace``-d over it, then the directory ``fsync``-ed; on error the temporary file is removed.
- :func:`_disk_errors` / :func:`_write_error`: a full disk, an exceeded quota, a read-only or denied
  ``--out`` become a :class:`~headlab.errors.ConfigError` that says what to do.
- :func:`_checksum`, :func:`_damage`, :func:`_unreadable`: a file's ``{"sha256", "size"}`` and why a
  file does not match its manifest record (or, without one, why its format's header does not read).
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from headlab.errors import ConfigError

#: the reason :func:`_damage` gives for a file the manifest records but the disk lacks
MISSING = "is missing"


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


# -- damage found on resume ------------------------------------------------------------------
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
