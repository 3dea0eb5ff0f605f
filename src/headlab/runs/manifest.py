"""``manifest.json``: its keys, reading it, and the library versions a new run records."""

from __future__ import annotations

import json
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from headlab.errors import ConfigError

MANIFEST = "manifest.json"
#: manifest key: ``{relative path: {"sha256": hex, "size": bytes}}`` of every file headlab wrote
FILES = "files"
#: statuses after which the job writes nothing more; setting one releases the directory
FINAL_STATUSES = ("complete", "interrupted")


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("headlab", "torch", "transformers", "numpy", "pandas", "safetensors"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


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


def _diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if not keys:
        return "different kind"
    shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys[:3])
    return shown + (" ..." if len(keys) > 3 else "")
