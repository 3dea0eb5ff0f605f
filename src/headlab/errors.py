"""Exceptions raised by headlab. Every message names what was wrong and what to do instead."""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "HeadlabError",
    "ModelNotFoundError",
    "StatsMismatchError",
    "check_count",
]


class HeadlabError(Exception):
    """Base class of every error headlab raises on purpose."""


class ConfigError(HeadlabError, ValueError):
    """A plan, option or input is invalid; the message says how to fix it."""


class ModelNotFoundError(HeadlabError):
    """A model could not be located or loaded."""


class StatsMismatchError(ConfigError):
    """Activation statistics were collected on another model or head layout."""


def check_count(name: str, value: object, *, low: int = 1, hint: str | None = None) -> int:
    """``value`` if it is an integer >= ``low``, else a :class:`ConfigError` naming the option
    (and ``hint``, e.g. ``"set --steps"``): the one check of every count headlab takes."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        words = "a positive integer" if low == 1 else f"an integer >= {low}"
        raise ConfigError(f"{name} must be {words}, got {value!r}" + (f"; {hint}" if hint else ""))
    return value
