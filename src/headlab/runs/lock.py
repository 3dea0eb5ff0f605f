"""The one-writer lock of a run directory: an exclusive ``flock`` on ``<out>.lock``.

The lock file lives *beside* the run directory, not inside it, so that ``--force`` (which deletes
the directory) and two commands creating the directory at the same moment are still serialised by
one lock file. It is deleted on release (while still locked, and a taker re-checks the inode it
locked, so the deletion never lets two writers in). The kernel drops the lock when its process
dies, so a stale lock file is simply taken over; the pid, host and time written inside it only
serve the message to a second writer. Locks still held at exit are released (:func:`_release_all`).
"""

from __future__ import annotations

import atexit
import errno
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from headlab.errors import ConfigError
from headlab.runs.files import _disk_errors, _write_error

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
