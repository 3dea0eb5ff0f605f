"""Memory budgets as text, for ``--max-memory`` and ``load_model(max_memory=...)``; free of heavy
imports so the command line parses them strictly when it reads its arguments.

A budget names a device and a size: ``cpu=2GiB,0=10GiB`` (``DEVICE=SIZE``, comma-separated).
Devices are ``cpu``, ``mps``, a CUDA GPU index (``0``) or ``cuda:N``; sizes are a whole number of
bytes or a number with a unit (``B``, ``KB``/``MB``/``GB``/``TB`` in powers of 1000,
``KiB``/``MiB``/``GiB``/``TiB`` in powers of 1024; case is ignored, and ``b`` never means bits).
"""

from __future__ import annotations

import re

__all__ = ["MEMORY_DEVICES", "max_memory_budget", "memory_bytes", "parse_max_memory"]

#: how a device of a memory budget is written (a GPU as its index or ``cuda:N``)
MEMORY_DEVICES = "cpu, mps, a CUDA GPU index (0, 1 ...) or cuda:N"

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([a-z]*)")
_GPU = re.compile(r"(?:cuda:)?(\d+)")


def memory_bytes(size: int | str) -> int:
    """``size`` in bytes: a non-negative whole number of bytes, or text such as ``"10GiB"``,
    ``"2.5GB"``, ``"512MiB"`` or ``"1000000"``.

    Raises:
        ValueError: anything else (the message lists the units).
    """
    if isinstance(size, bool) or not isinstance(size, int | str):
        raise ValueError(f"memory size {size!r} is neither a number of bytes nor text like '10GiB'")
    if isinstance(size, int):
        if size < 0:
            raise ValueError(f"memory size {size} is negative")
        return size
    match = _SIZE.fullmatch(size.strip().lower())
    if match is None or match.group(2) not in _UNITS:
        raise ValueError(
            f"memory size {size!r} is not a number with a unit; write e.g. 10GiB, 2.5GB, 512MiB "
            "or a whole number of bytes (units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"
        )
    number, unit = match.groups()
    if not unit and "." in number:
        raise ValueError(f"memory size {size!r}: a number of bytes must be whole")
    return int(float(number) * _UNITS[unit])


def _device_key(device: int | str) -> int | str:
    """``0``, ``"0"`` and ``"cuda:0"`` -> ``0``; ``"cpu"``, ``"mps"`` -> themselves."""
    if isinstance(device, bool):
        raise ValueError(f"memory budget device {device!r}: use {MEMORY_DEVICES}")
    if isinstance(device, int):
        if device < 0:
            raise ValueError(f"memory budget device {device}: a GPU index is 0 or more")
        return device
    if isinstance(device, str):
        name = device.strip().lower()
        if name in ("cpu", "mps"):
            return name
        match = _GPU.fullmatch(name)
        if match is not None:
            return int(match.group(1))
    if device == "disk":
        raise ValueError(
            "a memory budget for 'disk' is not needed: disk offload takes what does not fit "
            "elsewhere (give an offload folder to allow it)"
        )
    raise ValueError(f"memory budget device {device!r} is unknown; use {MEMORY_DEVICES}")


def max_memory_budget(budget: dict[int | str, int | str]) -> dict[int | str, int]:
    """``budget`` with devices normalised (a GPU as its index) and sizes in bytes.

    Raises:
        ValueError: an unknown device, a device named twice, or a size that is not one.
    """
    if not isinstance(budget, dict) or not budget:
        raise ValueError(
            f"max_memory must be a non-empty dict of device -> size, e.g. "
            f"{{'cpu': '2GiB', 0: '10GiB'}}; got {budget!r}"
        )
    out: dict[int | str, int] = {}
    for device, size in budget.items():
        key = _device_key(device)
        if key in out:
            raise ValueError(f"max_memory names device {key!r} twice")
        try:
            out[key] = memory_bytes(size)
        except ValueError as err:
            raise ValueError(f"max_memory for {device!r}: {err}") from None
    return out


def parse_max_memory(text: str) -> dict[int | str, int]:
    """``"cpu=2GiB,0=10GiB"`` -> ``{"cpu": 2147483648, 0: 10737418240}`` (``DEVICE=SIZE``,
    comma-separated; see the module docstring).

    Raises:
        ValueError: an item without exactly one ``=``, an empty item, or what
            :func:`max_memory_budget` refuses.
    """
    items = [t.strip() for t in text.split(",")]
    if not text.strip() or any(not t for t in items):
        raise ValueError(
            f"--max-memory {text!r} has an empty item; write DEVICE=SIZE pairs separated by "
            "commas, e.g. cpu=2GiB,0=10GiB"
        )
    budget: dict[int | str, int | str] = {}
    for item in items:
        device, eq, size = item.partition("=")
        if not eq or "=" in size or not device.strip() or not size.strip():
            raise ValueError(
                f"--max-memory item {item!r} is not DEVICE=SIZE; write e.g. cpu=2GiB,0=10GiB"
            )
        key = _device_key(device)
        if key in budget:
            raise ValueError(f"--max-memory names device {key!r} twice")
        budget[key] = size.strip()
    return max_memory_budget(budget)
