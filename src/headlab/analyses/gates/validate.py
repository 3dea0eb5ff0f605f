"""Are gate labels causal? Ablate the heads a gate fit singled out and compare with random heads.

Following the CHG paper's validation: zeroing the ``k`` most facilitating heads should hurt the
metric more than zeroing ``k`` random heads (several draws), and zeroing the interfering heads
should not hurt (ideally it helps). Every ablation goes through :func:`headlab.run_plans`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from torch import nn

from headlab.analyses.gates.core import gate_metric
from headlab.batch import Batch
from headlab.engine import run_plans
from headlab.errors import ConfigError
from headlab.heads import Head, top_heads
from headlab.interventions import Plan, Zero
from headlab.metrics import get_metric
from headlab.models.layout import Layout, describe

__all__ = [
    "ablate_groups",
    "label_groups",
    "validate_contrast",
    "validate_labels",
    "validation_summary",
]


def label_groups(
    table: pd.DataFrame,
    *,
    k: int,
    n_random: int = 5,
    seed: int = 0,
    top: str = "facilitating",
    bottom: str | None = "interfering",
    label: str = "label",
) -> dict[str, list[Head]]:
    """Head sets to ablate: ``top`` (the ``k`` highest ``top`` scores), ``bottom`` (heads
    labelled ``bottom``, at most ``k``, highest score first; omitted when none is), and
    ``random:0 .. random:n-1`` (``k`` heads drawn uniformly without replacement)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"k (heads to ablate per group) must be a positive integer, got {k!r}")
    if k > len(table):
        raise ConfigError(f"k = {k} exceeds the {len(table)} heads of the model; use a smaller k")
    groups = {top: top_heads(table, top, k)}
    if bottom is not None:
        chosen = top_heads(table, bottom, k, where=table[label] == bottom)
        if chosen:
            groups[bottom] = chosen
    every = [(int(r.layer), int(r.head)) for r in table.itertuples()]
    rng = np.random.default_rng(seed)
    for i in range(n_random):
        pick = rng.choice(len(every), size=k, replace=False)
        groups[f"random:{i}"] = [every[j] for j in sorted(pick)]
    return groups


def ablate_groups(
    model: nn.Module,
    batch: Batch,
    groups: Mapping[str, Sequence[Head]],
    *,
    metric: str | None = None,
    layout: Layout | None = None,
    batch_size: int = 8,
) -> pd.DataFrame:
    """Zero each group of heads together and score it.

    Columns: ``group, draw, n_heads, heads`` ("L.H L.H ..."), ``metric, value, baseline, delta,
    effect`` (``delta`` oriented so that positive means the ablation hurts).
    """
    layout = layout or describe(model)
    metric = metric or gate_metric(batch)
    m = get_metric(metric)
    names = list(groups)
    plans = [Plan()] + [Plan.heads(list(groups[n]), Zero()) for n in names]
    scores = run_plans(model, batch, plans, [metric], layout=layout, batch_size=batch_size)
    base = scores[0][m.name].mean
    rows = []
    for name, sc in zip(names, scores[1:], strict=True):
        kind, _, draw = name.partition(":")
        value = sc[m.name].mean
        delta = value - base
        rows.append(
            {
                "group": kind,
                "draw": int(draw) if draw else 0,
                "n_heads": len(groups[name]),
                "heads": " ".join(f"{ly}.{h}" for ly, h in groups[name]),
                "metric": m.name,
                "value": value,
                "baseline": base,
                "delta": delta,
                "effect": -delta if m.higher_is_better else delta,
            }
        )
    return pd.DataFrame(rows)


def validate_labels(
    model: nn.Module,
    batch: Batch,
    table: pd.DataFrame,
    *,
    k: int = 5,
    n_random: int = 5,
    seed: int = 0,
    metric: str | None = None,
    layout: Layout | None = None,
    batch_size: int = 8,
) -> pd.DataFrame:
    """Ablate the top-``k`` facilitating heads, ``n_random`` random sets of ``k`` heads, and (up
    to ``k``) interfering heads of a CHG head table; see :func:`ablate_groups` for columns."""
    groups = label_groups(table, k=k, n_random=n_random, seed=seed)
    return ablate_groups(model, batch, groups, metric=metric, layout=layout, batch_size=batch_size)


def validate_contrast(
    model: nn.Module,
    retain: Batch,
    forget: Batch,
    table: pd.DataFrame,
    *,
    k: int = 5,
    n_random: int = 5,
    seed: int = 0,
    metric: str | None = None,
    layout: Layout | None = None,
    batch_size: int = 8,
) -> pd.DataFrame:
    """Ablate the top-``k`` forget-specific heads of a contrastive head table and ``n_random``
    random sets of ``k`` heads, on the retain set (scored by ``metric``) and on the forget set
    (scored by its own :func:`gate_metric`); groups are suffixed ``@retain`` / ``@forget``."""
    groups = label_groups(table, k=k, n_random=n_random, seed=seed, top="forget_score", bottom=None)
    parts = []
    for name, batch, m in (("retain", retain, metric), ("forget", forget, None)):
        part = ablate_groups(model, batch, groups, metric=m, layout=layout, batch_size=batch_size)
        parts.append(part.assign(group=part["group"] + f"@{name}"))
    return pd.concat(parts, ignore_index=True)


def validation_summary(results: pd.DataFrame) -> pd.DataFrame:
    """One row per group: ``group, n_draws, n_heads, effect`` (mean), ``effect_sd``, ``value``;
    results with a ``split`` column (``headlab gate``'s) get one row per split and group."""
    keys = ["split", "group"] if "split" in results.columns else ["group"]
    out = results.groupby(keys, sort=False).agg(
        n_draws=("draw", "size"),
        n_heads=("n_heads", "mean"),
        effect=("effect", "mean"),
        effect_sd=("effect", "std"),
        value=("value", "mean"),
    )
    return out.reset_index()
