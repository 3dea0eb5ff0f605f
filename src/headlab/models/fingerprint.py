"""Model fingerprints: a cheap sha256 that identifies a model's weights, cached on the model.

Statistics record the fingerprint of the model they were collected on and are checked against it at
every intervention that reads them (:func:`cached_fingerprint` makes that check free).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

from headlab.models.dispatch import state_tensors

_FINGERPRINT_SAMPLES = 4096
_CONFIG_KEYS_IGNORED = {"transformers_version", "dtype", "torch_dtype", "architectures"}
#: attribute holding a model's fingerprint once :func:`cached_fingerprint` computed it
FINGERPRINT_ATTR = "_headlab_fingerprint"


def model_fingerprint(model: torch.nn.Module) -> str:
    """A cheap sha256 identifying a model's weights: config, tensor names/shapes/dtypes and up to
    4096 evenly spaced values of every tensor. Equal for two loads of the same weights."""
    h = hashlib.sha256()
    h.update(type(model).__name__.encode())
    config = getattr(model, "config", None)
    if config is not None:
        h.update(json.dumps(_clean_config(config.to_dict()), sort_keys=True, default=str).encode())
    for name, tensor in state_tensors(model):  # offloaded weights read in, one module at a time
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
