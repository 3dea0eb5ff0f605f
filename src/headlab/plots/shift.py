"""Figures of ``headlab shift``: how far an ablation pushes the downstream activations."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from headlab.errors import ConfigError

__all__ = ["shift_figure"]


def shift_figure(table: pd.DataFrame, *, target: str | None = None) -> Figure:
    """Norm ratio and fraction beyond 3 sd against the layer, one line per method, and KL per
    method, for one ``target`` (default: the first with several heads, else the first)."""
    targets = list(dict.fromkeys(table["target"]))
    if target is None:
        multi = table[table["n_heads"] > 1]["target"]
        target = str(multi.iloc[0]) if len(multi) else targets[0]
    sub = table[table["target"] == target]
    if sub.empty:
        raise ConfigError(f"no rows for target {target!r}; have {targets}")
    methods = list(dict.fromkeys(sub["method"]))
    fig = Figure(figsize=(11, 3.3))
    ax_n, ax_b, ax_k = fig.subplots(1, 3, gridspec_kw={"width_ratios": [3, 3, 2]})
    for i, m in enumerate(methods):
        g = sub[sub["method"] == m]
        for ax, metric in ((ax_n, "norm_ratio"), (ax_b, "frac_3sigma")):
            r = g[g["metric"] == metric].sort_values("at_layer")
            ax.plot(r["at_layer"], r["value"], marker=".", color=f"C{i}", label=m)
    clean = sub[(sub["metric"] == "frac_3sigma") & (sub["method"] == methods[0])]
    ax_b.plot(clean["at_layer"], clean["baseline"], "k--", lw=0.8, label="clean")
    ax_n.axhline(1, color="0.6", lw=0.8)
    end = "kl" if (sub["metric"] == "kl").any() else "embed_cos"  # a bare encoder: no logits
    kl = sub[sub["metric"] == end].set_index("method").loc[methods, "value"]
    ax_k.bar(range(len(methods)), kl.to_numpy(), color=[f"C{i}" for i in range(len(methods))])
    ax_k.set_xticks(range(len(methods)), methods, fontsize=8)
    ax_n.set(xlabel="layer (block output)", ylabel="‖r_abl‖ / ‖r_clean‖", title="norm ratio")
    ax_b.set(xlabel="layer (block output)", ylabel="fraction", title="beyond 3σ of clean")
    if end == "kl":
        ax_k.set(ylabel="KL(clean ‖ ablated), nats", title="output KL")
    else:
        ax_k.set(ylabel="1 − cos(clean, ablated)", title="sentence embedding")
    for ax in (ax_n, ax_b, ax_k):
        ax.title.set_fontsize(9)
    if np.nanmax(sub[sub["metric"] == "norm_ratio"]["value"]) > 3:
        ax_n.set_yscale("log")
    ax_n.legend(fontsize=7)
    ax_b.legend(fontsize=7)
    fig.suptitle(f"Distribution shift from ablating {target}", fontsize=10)
    fig.tight_layout()
    return fig
