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

Where each piece lives:

- :mod:`~headlab.runs.files`: atomic writes, checksums, the damage checks of resume, and the
  translation of a full disk or a denied write into a ConfigError.
- :mod:`~headlab.runs.manifest`: ``manifest.json`` (its keys, reading it, library versions).
- :mod:`~headlab.runs.lock`: the one-writer lock on ``<out>.lock``.
- :mod:`~headlab.runs.rundir`: :class:`RunDir`, one run's directory.
"""

from headlab.runs.files import MISSING as MISSING
from headlab.runs.files import atomic_path as atomic_path
from headlab.runs.manifest import FILES as FILES
from headlab.runs.manifest import FINAL_STATUSES as FINAL_STATUSES
from headlab.runs.manifest import MANIFEST as MANIFEST
from headlab.runs.manifest import library_versions as library_versions
from headlab.runs.manifest import read_manifest as read_manifest
from headlab.runs.rundir import RunDir as RunDir

__all__ = ["RunDir", "atomic_path", "library_versions", "read_manifest"]
