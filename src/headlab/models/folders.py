"""What a local model folder holds, checked before transformers reads it, and the errors that
explain what is wrong and how to fix it: unreadable ``config.json``, an unknown model type, custom
code not trusted, no weights, truncated or corrupt safetensors, pickled weights not allowed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from headlab.errors import ConfigError, ModelNotFoundError

_SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
_PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
_OTHER_WEIGHTS = ("tf_model.h5", "flax_model.msgpack", "*.gguf", "*.pt", "*.pth", "*.ckpt")


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
