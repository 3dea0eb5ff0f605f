"""Models larger than one device: accelerate's device maps, checked before any weight is read.

``load_model(..., device_map=...)`` places a model's modules across GPUs, the CPU and the disk
(accelerate's *dispatch*): each module runs on its *execution device*, and accelerate's hooks move
activations between devices and read disk-offloaded weights in just before a module runs (between
forwards those parameters sit on the ``meta`` device). The numbers are those of the unsplit model.

:func:`dispatch_options` checks the options (:class:`Dispatch`); :func:`plan_device_map` turns them
into the explicit ``{module: device}`` map transformers then loads, computed on an empty (meta)
copy of the model, so a model that does not fit is refused before its weights are read: headlab
offloads to disk only where an offload folder is given. :func:`state_tensors` and
:func:`loaded_weights` read weights whether or not they are offloaded.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from headlab.defaults import DEVICE_MAPS
from headlab.errors import ConfigError, HeadlabError
from headlab.memory import max_memory_budget
from headlab.models.layout import input_device

__all__ = [
    "Dispatch",
    "dispatch_options",
    "loaded_weights",
    "placement_summary",
    "plan_device_map",
    "quiet_dispatch",
    "state_tensors",
]

_FIX = (
    "give --offload-folder DIR (Python: offload_folder=DIR) to offload them to disk (same numbers, "
    "slower), or allow more memory with --max-memory (Python: max_memory={...})"
)


@dataclass(frozen=True)
class Dispatch:
    """Checked options of a dispatched load.

    Attributes:
        device_map: one of ``DEVICE_MAPS`` (accelerate computes the map) or an explicit
            ``{module name: device}`` map (devices: a GPU index, ``"cpu"``, ``"mps"``, ``"disk"``).
        max_memory: bytes each device may hold (a GPU as its index), or ``None``: what is free.
        offload_folder: where disk-offloaded weights go (``None``: no disk offload).
    """

    device_map: str | Mapping[str, int | str]
    max_memory: Mapping[int | str, int] | None = None
    offload_folder: str | None = None


def dispatch_options(
    device: str | torch.device | None,
    device_map: str | Mapping[str, Any] | None,
    max_memory: Mapping[Any, int | str] | None,
    offload_folder: str | os.PathLike[str] | None,
) -> Dispatch | None:
    """The checked :class:`Dispatch` of ``load_model``'s options (``None`` without a device map).

    Raises:
        ConfigError: ``device`` and ``device_map`` both given; ``max_memory`` or
            ``offload_folder`` without ``device_map``; an unknown map name or device; a memory
            budget that is not one; a GPU that does not exist; an offload folder that is a file.
    """
    if device_map is None:
        for name, value in (("max_memory", max_memory), ("offload_folder", offload_folder)):
            if value is not None:
                raise ConfigError(
                    f"{name} applies only to a dispatched model; add device_map='auto' "
                    f"(--device-map auto), or drop {name}"
                )
        return None
    if device is not None:
        raise ConfigError(
            f"device {str(device)!r} and device_map {_shown(device_map)} both say where the model "
            "goes; give one: device_map spreads it over the devices (with --max-memory limiting "
            "each), device puts all of it on one"
        )
    if isinstance(device_map, str):
        if device_map not in DEVICE_MAPS:
            raise ConfigError(
                f"unknown device_map {device_map!r}; use one of {', '.join(DEVICE_MAPS)}, or a "
                "dict naming each module's device"
            )
        placed: str | dict[str, int | str] = device_map
    elif isinstance(device_map, Mapping) and device_map:
        placed = {str(k): _map_device(k, v) for k, v in device_map.items()}
    else:
        raise ConfigError(
            f"device_map must be one of {', '.join(DEVICE_MAPS)} or a non-empty dict of module "
            f"name -> device, got {device_map!r}"
        )
    budget = None
    if max_memory is not None:
        try:
            budget = max_memory_budget(dict(max_memory))
        except ValueError as err:
            raise ConfigError(str(err)) from None
        for key in budget:
            _check_device(key, "max_memory")
    folder = None
    if offload_folder is not None:
        folder = os.fspath(offload_folder)
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise ConfigError(f"offload folder {folder} is a file; give a folder (it is created)")
    return Dispatch(placed, budget, folder)


def _shown(device_map: object) -> str:
    return repr(device_map) if isinstance(device_map, str) else "(a dict)"


def _map_device(module: object, device: object) -> int | str:
    """One device of an explicit map: a GPU index, ``cpu``, ``mps`` or ``disk``."""
    if isinstance(device, torch.device):
        device = str(device)
    if isinstance(device, str):
        name = device.strip().lower()
        if name in ("cpu", "disk", "mps"):
            _check_device(name, "device_map")
            return name
        if name.startswith("cuda:") and name[5:].isdigit():
            device = int(name[5:])
        elif name.isdigit():
            device = int(name)
    if isinstance(device, int) and not isinstance(device, bool) and device >= 0:
        _check_device(device, "device_map")
        return device
    raise ConfigError(
        f"device_map puts {module!r} on {device!r}; use a GPU index (0, 1 ...), 'cuda:N', 'cpu', "
        "'mps' or 'disk'"
    )


def _check_device(device: int | str, option: str) -> None:
    if isinstance(device, int):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if device >= count:
            have = f"only {count} CUDA GPU(s)" if count else "no usable CUDA GPU"
            raise ConfigError(
                f"{option} names GPU {device}, but this machine has {have}; name "
                + (f"GPUs below {count} or " if count else "")
                + "cpu (and allow disk offload with an offload folder)"
            )
    elif device == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{option} names 'mps', which is not available here; use cpu")


# --- the map -------------------------------------------------------------------------------------


def plan_device_map(
    model_class: Any, config: Any, dtype: torch.dtype, dispatch: Dispatch, ref: object
) -> dict[str, int | str]:
    """The explicit ``{module: device}`` map ``model_class`` is loaded with, computed on an empty
    copy of the model (no weight is read).

    Raises:
        ConfigError: the map puts modules on disk but no offload folder is given (the model does
            not fit in the memory allowed), or an explicit map leaves tensors without a device
            or names modules the model lacks.
    """
    meta = _empty_model(model_class, config, dtype)
    if isinstance(dispatch.device_map, str):
        budget = None if dispatch.max_memory is None else dict(dispatch.max_memory)
        device_map = _computed_map(meta, dispatch.device_map, budget)
    else:
        device_map = dict(dispatch.device_map)
        _check_covers(meta, device_map)
    on_disk = [name or "the whole model" for name, dev in device_map.items() if dev == "disk"]
    if on_disk and dispatch.offload_folder is None:
        from accelerate.utils import compute_module_sizes

        shown = _few(on_disk)
        if isinstance(dispatch.device_map, str):
            size = compute_module_sizes(meta)[""]
            raise ConfigError(
                f"{ref} needs {_gib(size)} for its {str(dtype).removeprefix('torch.')} weights, "
                f"more than the memory allowed ({_budget_text(dispatch.max_memory)}): "
                f"device_map={dispatch.device_map!r} would put {len(on_disk)} module(s) on disk "
                f"[{shown}], and headlab offloads to disk only into a folder you name; {_FIX}"
            )
        raise ConfigError(
            f"the device_map puts {shown} on 'disk', which needs an offload folder; give "
            "offload_folder=DIR (--offload-folder DIR)"
        )
    return device_map


def _empty_model(model_class: Any, config: Any, dtype: torch.dtype) -> nn.Module:
    """``model_class`` built from ``config`` on the meta device: its module tree and tensor sizes,
    no memory."""
    factory = getattr(model_class, "from_config", None) or model_class._from_config
    with torch.device("meta"):
        return factory(copy.deepcopy(config), dtype=dtype)


def _computed_map(meta: nn.Module, name: str, budget: dict[int | str, int] | None) -> dict:
    """The map transformers computes for ``device_map=name`` (its own helper where it has one, so
    the map is the one ``from_pretrained`` would compute)."""
    try:
        from transformers.integrations.accelerate import _get_device_map
    except ImportError:  # another transformers layout: accelerate's public functions
        from accelerate import infer_auto_device_map
        from accelerate.utils import get_balanced_memory, get_max_memory

        no_split = getattr(meta, "_no_split_modules", None)
        memory = (
            get_max_memory(budget)
            if name == "sequential"
            else get_balanced_memory(
                meta, budget, no_split_module_classes=no_split, low_zero=name == "balanced_low_0"
            )
        )
        return infer_auto_device_map(meta, max_memory=memory, no_split_module_classes=no_split)
    return dict(_get_device_map(meta, name, budget, None))


def _check_covers(meta: nn.Module, device_map: dict[str, int | str]) -> None:
    """An explicit map names modules of the model, gives every tensor a device (the longest
    matching name decides) and keeps tied weights together (accelerate cannot split them)."""
    from accelerate.utils import find_tied_parameters

    modules = dict(meta.named_modules())
    tensors = dict(meta.named_parameters())
    unknown = [k for k in device_map if k and k not in modules and k not in tensors]
    if unknown:
        raise ConfigError(
            f"device_map names {', '.join(map(repr, unknown[:3]))}, which "
            f"{'is' if len(unknown) == 1 else 'are'} no module of {type(meta).__name__}; "
            "print(model) shows the module names"
        )
    keys = sorted(device_map, key=len, reverse=True)

    def device_of(tensor: str) -> int | str | None:
        key = next((k for k in keys if k in ("", tensor) or tensor.startswith(k + ".")), None)
        return None if key is None else device_map[key]

    missing = [n for n in meta.state_dict() if device_of(n) is None]
    if missing:
        raise ConfigError(
            f"device_map gives no device to {_few(missing)}; name their modules (or a module "
            "holding them) in the map"
        )
    for group in find_tied_parameters(meta):
        devices = {name: device_of(name) for name in group}
        if len(set(devices.values())) > 1:
            where = ", ".join(f"{name} on {dev!r}" for name, dev in devices.items())
            raise ConfigError(
                f"device_map splits tied weights ({where}): they are one tensor, so their "
                "modules must share a device; put them on the same one"
            )


def _few(names: list[str]) -> str:
    """The first three names, and how many more."""
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return ", ".join(names[:3]) + more


def _gib(size: int) -> str:
    """``size`` bytes in the largest binary unit that keeps it above 1/8."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if size >= scale // 8:
            return f"{size / scale:.2f} {unit}"
    return f"{size / 2**10:.2f} KiB"


def _budget_text(budget: Mapping[int | str, int] | None) -> str:
    if budget is None:
        from accelerate.utils import get_max_memory

        free = get_max_memory()
        return "what is free: " + ", ".join(f"{k}={_gib(v)}" for k, v in free.items())
    return "max_memory " + ", ".join(f"{k}={_gib(v)}" for k, v in budget.items())


def placement_summary(model: nn.Module) -> str:
    """One status line: how many modules of the loaded model sit on each device."""
    device_map = getattr(model, "hf_device_map", None)
    if not device_map:  # one device held it all: transformers added no hooks
        return f"device map: the whole model fits on {input_device(model)}"
    counts: dict[str, int] = {}
    for device in device_map.values():
        key = f"GPU {device}" if isinstance(device, int) else str(device)
        counts[key] = counts.get(key, 0) + 1
    where = ", ".join(f"{n} module(s) on {key}" for key, n in counts.items())
    if "disk" in counts:
        where += " (read from disk at every forward: same numbers, slower)"
    return f"device map: {where}"


@contextmanager
def quiet_dispatch() -> Iterator[None]:
    """Silence accelerate's warning that offloaded parameters sit on the meta device (expected
    here; headlab prints nothing unless asked)."""
    import logging

    logger = logging.getLogger("accelerate.big_modeling")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


# --- offloaded weights ---------------------------------------------------------------------------


@contextmanager
def loaded_weights(module: nn.Module) -> Iterator[nn.Module]:
    """A context in which ``module``'s own parameters hold their values, also where accelerate
    offloaded them (to the CPU or disk: outside a forward they sit on the ``meta`` device).
    Values read inside stay valid after it; the module is offloaded again on exit."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None or not _offloads(hook):
        yield module
        return
    hook.pre_forward(module)
    try:
        yield module
    finally:
        hook.post_forward(module, None)


def _offloads(hook: Any) -> bool:
    if getattr(hook, "offload", False):
        return True
    return any(_offloads(h) for h in getattr(hook, "hooks", ()))


def state_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``model.state_dict().items()`` with the values of offloaded tensors read in (one module at a
    time, so a disk-offloaded model is never whole in memory).

    Raises:
        HeadlabError: a tensor is on the meta device and no accelerate hook holds its value.
    """
    for name, tensor in model.state_dict().items():
        if tensor.device.type == "meta":
            path, _, leaf = name.rpartition(".")
            with loaded_weights(model.get_submodule(path)) as module:
                tensor = getattr(module, leaf)
            if tensor.device.type == "meta":
                raise HeadlabError(
                    f"{name} is on the meta device and no accelerate hook holds its value (a "
                    "model loaded without its weights?); load the model with headlab.load_model"
                )
        yield name, tensor.detach()
