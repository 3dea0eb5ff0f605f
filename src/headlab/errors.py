"""Exceptions raised by headlab. Every message names what was wrong and what to do instead."""

from __future__ import annotations

__all__ = ["ConfigError", "HeadlabError", "ModelNotFoundError", "StatsMismatchError"]


class HeadlabError(Exception):
    """Base class of every error headlab raises on purpose."""


class ConfigError(HeadlabError, ValueError):
    """A plan, option or input is invalid; the message says how to fix it."""


class ModelNotFoundError(HeadlabError):
    """A model could not be located or loaded."""


class StatsMismatchError(ConfigError):
    """Activation statistics were collected on another model or head layout."""
