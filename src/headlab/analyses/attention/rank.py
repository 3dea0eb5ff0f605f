"""Compare two head rankings from per-example tables: attention mass (plausibility) against the
causal effect (faithfulness), with a bootstrap over examples.

:func:`compare_rankings` gives one row per head (:data:`TABLE_COLUMNS`: both scores and both
1-based ranks, rank 1 = largest mass / largest ``|effect|``) and a one-row summary: ``spearman``
(mass vs ``abs_effect`` over heads), ``spearman_signed`` (mass vs signed ``effect``), ``ci_low`` /
``ci_high`` (bias-corrected percentile bootstrap over examples,
:func:`headlab.analyses.ranking.bc_interval`), ``top_k_overlap`` of the two top-k sets and its
chance level ``k^2 / heads``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from headlab.analyses.ranking import bc_interval, rank_correlation, spearman, topk_overlap
from headlab.errors import ConfigError

__all__ = ["TABLE_COLUMNS", "compare_rankings"]

TABLE_COLUMNS = [
    "layer", "head", "plausibility", "plausibility_rank", "effect", "abs_effect",
    "faithfulness_rank", "value", "baseline", "delta", "method", "metric", "keys", "n",
]  # fmt: skip


def _matrices(mass: pd.DataFrame, effects: pd.DataFrame) -> dict[str, Any]:
    """The per-example tables as ``[example, head]`` arrays over the examples and heads both
    hold: ``mass``, ``effect``, ``delta``; ``weight`` and ``baseline`` are ``[example]``."""
    # pivot, not pivot_table: no aggregation and no layer x head product of absent heads
    m = mass.pivot(index="example", columns=["layer", "head"], values="value")
    piv = {
        c: effects.pivot(index="example", columns=["layer", "head"], values=c)
        for c in ("effect", "delta")
    }
    per_example = effects.groupby("example")[["weight", "baseline"]].first()
    heads = [h for h in piv["effect"].columns if h in m.columns]
    measured = set(m.index[m[heads].notna().all(axis=1)]) if heads else set()
    examples = [x for x in piv["effect"].index if x in measured]
    if not examples:
        raise ConfigError(
            "no example has both an attention mass (a key token to measure) and a causal effect "
            "on the same heads; check the key set (--keys / --tokens) and the tables"
        )
    out: dict[str, Any] = {"heads": [(int(ly), int(h)) for ly, h in heads]}
    out["mass"] = m.loc[examples, heads].to_numpy(dtype=float)
    for c, t in piv.items():
        out[c] = t.loc[examples, heads].to_numpy(dtype=float)
    for c in ("weight", "baseline"):
        out[c] = per_example.loc[examples, c].to_numpy(dtype=float)
    return out


def _means(mass: np.ndarray, eff: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-head mean mass and weighted mean effect (NaN: not scored); leading axes kept:
    ``mass, eff: [..., example, head]``, ``w: [..., example]``."""
    with np.errstate(invalid="ignore", divide="ignore"):
        plaus = mass.mean(-2)
        ok = np.isfinite(eff)
        ww = np.where(ok, w[..., None], 0.0)  # [..., example, head]
        effect = (np.where(ok, eff, 0.0) * ww).sum(-2) / ww.sum(-2)
    return plaus, effect


def compare_rankings(
    mass: pd.DataFrame,
    effects: pd.DataFrame,
    *,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    top_k: int = 10,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(per-head table, one-row summary)`` from :func:`attention_mass` and
    :func:`causal_effects` tables (see the module docstring)."""
    if n_boot < 0 or not 0 < ci < 1 or top_k < 1:
        raise ConfigError("need n_boot >= 0, 0 < ci < 1 and top_k >= 1")
    arr = _matrices(mass, effects)
    heads, m, e, w = arr["heads"], arr["mass"], arr["effect"], arr["weight"]
    plaus, effect = _means(m, e, w)
    _, delta = _means(m, arr["delta"], w)
    ok = np.isfinite(arr["baseline"])
    baseline = float(np.average(arr["baseline"][ok], weights=w[ok])) if ok.any() else math.nan
    meta = effects.groupby(["layer", "head"])[["method", "metric"]].first()
    table = pd.DataFrame(heads, columns=["layer", "head"]).join(meta, on=["layer", "head"])
    table["plausibility"] = plaus
    table["effect"] = effect
    table["abs_effect"] = np.abs(effect)
    table["plausibility_rank"] = table["plausibility"].rank(ascending=False, method="first")
    table["faithfulness_rank"] = table["abs_effect"].rank(ascending=False, method="first")
    table["baseline"] = baseline
    table["delta"] = delta
    table["value"] = baseline + delta
    table["keys"] = mass["keys"].iloc[0] if "keys" in mass else ""
    table["n"] = len(w)
    table = table.astype({"plausibility_rank": "int64", "faithfulness_rank": "int64"})
    table = table[TABLE_COLUMNS].sort_values(["layer", "head"]).reset_index(drop=True)

    k = min(top_k, len(heads))
    # the ranks break ties by position, as topk_overlap does: the same two top-k sets
    overlap = round(topk_overlap(table["plausibility"], table["abs_effect"], k) * k)
    rho = spearman(table["plausibility"], table["abs_effect"])
    lo = hi = math.nan
    if n_boot > 0 and len(w) > 1:
        rng = np.random.default_rng(seed)
        rhos = []
        for start in range(0, n_boot, 200):
            idx = rng.integers(0, len(w), size=(min(200, n_boot - start), len(w)))  # [boot, ex]
            pb, eb = _means(m[idx], e[idx], w[idx])  # [boot, head] each
            rhos.append(rank_correlation(pb, np.abs(eb)))
        lo, hi = bc_interval(np.concatenate(rhos), rho, ci)
    summary = pd.DataFrame(
        [
            {
                "method": table["method"].iloc[0], "metric": table["metric"].iloc[0],
                "keys": table["keys"].iloc[0], "spearman": rho,
                "spearman_signed": spearman(table["plausibility"], table["effect"]),
                "ci_low": lo, "ci_high": hi, "ci": ci, "n_boot": n_boot, "top_k": k,
                "top_k_overlap": overlap, "chance_overlap": k * k / len(heads),
                "n_heads": len(heads), "n_examples": len(w),
            }
        ]
    )  # fmt: skip
    return table, summary
