"""The CHG head taxonomy (:func:`head_taxonomy`): label every head from the fitted ``theta`` of the
``zero``, ``plus`` and ``minus`` fits of :mod:`headlab.analyses.gates.chg` (the definition is in
that module's docstring), with continuous scores and the spread over masks."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

__all__ = ["LABELS", "head_taxonomy"]

LABELS = ("facilitating", "interfering", "irrelevant", "unstable")


def _label(g_plus: np.ndarray, g_minus: np.ndarray, t: float) -> np.ndarray:
    hi_p, hi_m = g_plus >= t, g_minus >= t
    out = np.where(hi_p & hi_m, "facilitating", "interfering").astype(object)
    out[hi_p & ~hi_m] = "irrelevant"
    out[~hi_p & hi_m] = "unstable"
    return out


def head_taxonomy(
    theta_zero: torch.Tensor,
    theta_plus: torch.Tensor,
    theta_minus: torch.Tensor,
    threshold: float = 0.5,
) -> pd.DataFrame:
    """Tidy per-head table from the fitted ``theta`` (``[mask, layer, head]``) of the three fits.

    Gates are computed in float64 from ``theta``, so saturated gates still rank (a float32 gate
    is exactly 1 beyond ``theta`` ~ 17). Columns: ``layer, head, g_zero, g_plus, g_minus,
    facilitating, interfering, irrelevant, label, agreement`` (share of masks whose own label
    equals ``label``), then ``*_sd`` (spread over masks, 0 for a single mask) and ``n_masks``.
    Sorted by layer, head.
    """
    gz, gp, gm = (
        torch.sigmoid(t.detach().double().cpu()).numpy()
        for t in (theta_zero, theta_plus, theta_minus)
    )
    n_masks, n_layers, n_heads = gp.shape
    scores = {"facilitating": gm, "interfering": 1 - gp, "irrelevant": gp - gm}
    per_mask = _label(gp, gm, threshold)  # [mask, layer, head]
    mean_label = _label(gp.mean(0), gm.mean(0), threshold)  # [layer, head]
    layer, head = np.meshgrid(np.arange(n_layers), np.arange(n_heads), indexing="ij")
    cols: dict[str, object] = {"layer": layer.ravel(), "head": head.ravel()}
    values = {"g_zero": gz, "g_plus": gp, "g_minus": gm, **scores}
    for name, v in values.items():
        cols[name] = v.mean(0).ravel()
    cols["label"] = mean_label.ravel()
    cols["agreement"] = (per_mask == mean_label[None]).mean(0).ravel()
    for name, v in values.items():
        cols[f"{name}_sd"] = v.std(0, ddof=1).ravel() if n_masks > 1 else np.zeros(v[0].size)
    cols["n_masks"] = n_masks
    return pd.DataFrame(cols)
