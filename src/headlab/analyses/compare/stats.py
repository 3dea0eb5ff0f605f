"""Agreement between per-example importance measures: scores, Spearman with bootstrap intervals
over examples, top-k overlap (METHODS.md section 6, comparison protocol).

Every measure arrives as a *per-example table* (columns :data:`PER_EXAMPLE_COLUMNS`): one row per
``(measure, example, layer, head)`` with a ``value`` and a ``weight``. A multiset ``S`` of
examples (the whole batch, or a bootstrap resample) gives each head the score

    ``score_h = | sum_{i in S} w_i v_{i,h} / sum_{i in S} w_i |``

i.e. the weighted mean, then ``|.|`` for every measure alike (the protocol's "use |.|
consistently"). The ``gradient`` measure (Michel et al.) is then divided by its layer's l2 norm,
as :func:`headlab.estimate` does. With ``w_i`` the scored tokens of example ``i`` and ``v_{i,h}``
its mean change, the whole-batch score is exactly the token-weighted ``|delta|`` of a sweep.

Besides Spearman, :func:`agreement` reports what a search for the top heads needs: ``recall``,
the share of the reference's top-k heads among the measure's top-k (for two sets of k heads the
same number as the top-k overlap), ``depth``, how far down the measure's ranking one must go to
hold all of the reference's top-k (the exact ablations an estimate-ordered search would need),
and the measure's ``cost`` in forward-pass equivalents per example
(:func:`measure_cost`, the model of :mod:`headlab.analyses.estimate.cost`), also as a fraction of
the exact single-head sweep's on the same examples (``cost_fraction``). ``search_fraction`` adds
the exact ablation of the measure's top-``depth`` heads (a clean forward plus a forward from each
one's layer on): what a search that checks heads exactly in the measure's order pays, at least,
to hold the reference's whole top-k.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from headlab.analyses.estimate.cost import exact_sweep_cost, forward_from, gradient_cost, ig_cost
from headlab.analyses.estimate.ig import parse_ig
from headlab.analyses.ranking import bootstrap_counts, rank_correlation, topk_overlap
from headlab.errors import ConfigError

__all__ = [
    "PER_EXAMPLE_COLUMNS",
    "agreement",
    "measure_cost",
    "measure_scores",
    "pairwise_agreement",
    "recall_depth",
]

PER_EXAMPLE_COLUMNS = ["measure", "metric", "example", "layer", "head", "value", "weight"]
#: measures whose scores are divided by their layer's l2 norm after averaging (Michel et al.)
LAYER_NORMALISED = ("gradient",)


@dataclass(frozen=True, eq=False)
class _Arrays:
    """One measure as arrays: ``values [example, head]`` (heads in ``(layer, head)`` order),
    ``weights [example]``, ``layers [head]``."""

    measure: str
    metric: str
    values: np.ndarray
    weights: np.ndarray
    layers: np.ndarray

    def scores(self, counts: np.ndarray) -> np.ndarray:
        """``counts [draw, example]`` (how often each example is drawn) -> ``[draw, head]``."""
        cw = counts * self.weights[None, :]  # [draw, example]
        den = cw.sum(1, keepdims=True)  # [draw, 1]
        with np.errstate(invalid="ignore", divide="ignore"):
            out = np.abs(cw @ self.values / den)  # [draw, head]
        if self.measure in LAYER_NORMALISED:
            norm = np.zeros_like(out)
            for ly in np.unique(self.layers):
                cols = self.layers == ly
                norm[:, cols] = np.sqrt((out[:, cols] ** 2).sum(1, keepdims=True))
            out = out / (norm + 1e-20)
        return out


def _arrays(per_example: pd.DataFrame) -> tuple[dict[str, _Arrays], pd.DataFrame]:
    """Per measure arrays, checked to cover the same examples and heads; and the head index."""
    missing = [c for c in PER_EXAMPLE_COLUMNS if c not in per_example.columns]
    if missing:
        raise ConfigError(
            f"a per-example table needs the columns {PER_EXAMPLE_COLUMNS}; missing {missing}"
        )
    if per_example.empty:
        raise ConfigError("the per-example table is empty: measure something first")
    out: dict[str, _Arrays] = {}
    heads = examples = None
    for measure, g in per_example.groupby("measure", sort=False):
        # [example, head] with heads as (layer, head) columns
        wide = g.pivot(index="example", columns=["layer", "head"], values="value")
        weight = g.groupby("example")["weight"].first().reindex(wide.index)
        if wide.isna().to_numpy().any() or weight.isna().any():
            raise ConfigError(f"measure {measure!r} lacks some (example, head) rows")
        cols = pd.DataFrame(list(wide.columns), columns=["layer", "head"])
        if heads is None:
            heads, examples = cols, list(wide.index)
        elif not cols.equals(heads) or list(wide.index) != examples:
            raise ConfigError(
                f"measure {measure!r} covers other heads or examples than "
                f"{next(iter(out))!r}; compare measures taken on the same batch and heads"
            )
        metrics = g["metric"].unique()
        out[str(measure)] = _Arrays(
            str(measure),
            str(metrics[0]),
            wide.to_numpy(dtype=float),
            weight.to_numpy(dtype=float),
            cols["layer"].to_numpy(),
        )
    return out, heads


def measure_cost(name: str, n_layers: int, n_heads: int) -> float:
    """Forward-pass equivalents per example of a measure by name: ``ablation:*`` (the exact
    sweep), ``atp:*`` and ``gradient``, ``ig:*``, ``rollout`` and ``attention`` (one forward);
    NaN for a measure of the user's own (a per-example table can hold any name)."""
    if name.startswith("ablation:"):
        return exact_sweep_cost(n_layers, n_heads)
    if name.startswith("ig:"):
        return ig_cost(n_layers, parse_ig(name)[1], counterfactual=parse_ig(name)[0] == "patch")
    if name.startswith("atp:") or name == "gradient":
        return gradient_cost(counterfactual=name == "atp:patch")
    if name in ("rollout", "attention"):
        return 1.0
    return math.nan


def recall_depth(scores: np.ndarray, reference: np.ndarray, k: int) -> tuple[float, int]:
    """``(recall, depth)`` of ``scores`` against ``reference`` (one value per head, larger =
    more important): the share of the reference's top ``k`` among the top ``k`` of ``scores``,
    and the smallest ``m`` whose top ``m`` of ``scores`` holds all of the reference's top ``k``
    (ties broken by position, earlier first, as :func:`topk_overlap`)."""
    scores, reference = np.asarray(scores, dtype=float), np.asarray(reference, dtype=float)
    if not 1 <= k <= len(scores) or len(scores) != len(reference):
        raise ConfigError(f"recall needs 1 <= k <= {len(scores)} heads and equal lengths; k={k}")
    order = np.argsort(-np.nan_to_num(scores, nan=-np.inf), kind="stable")
    rank = np.empty(len(order), dtype=int)
    rank[order] = np.arange(1, len(order) + 1)  # 1 = the measure's most important head
    top = np.argsort(-reference, kind="stable")[:k]
    return float((rank[top] <= k).mean()), int(rank[top].max())


def measure_scores(per_example: pd.DataFrame) -> pd.DataFrame:
    """Every measure's score for every head on the whole batch: ``layer, head, measure, metric,
    value`` (the module's ``|weighted mean|``) and ``rank`` (1 = most important; ties share the
    lowest rank)."""
    arrays, heads = _arrays(per_example)
    parts = []
    for a in arrays.values():
        value = a.scores(np.ones((1, len(a.weights))))[0]
        part = heads.copy()
        part["measure"], part["metric"], part["value"] = a.measure, a.metric, value
        part["rank"] = pd.Series(-value).rank(method="min").astype("int64").to_numpy()
        parts.append(part)
    return pd.concat(parts, ignore_index=True)


def agreement(
    per_example: pd.DataFrame,
    *,
    reference: str,
    n_boot: int = 1000,
    k: int = 10,
    ci: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """Each measure against ``reference``: Spearman of the head scores with a bootstrap
    percentile interval over examples (all measures resampled together), and top-k overlap.

    Returns one row per other measure: ``measure, metric, reference, spearman, ci_low, ci_high,
    topk_overlap, recall, depth, cost, cost_fraction, search_fraction, k, n_examples, n_heads,
    n_boot`` (see the
    module docstring; ``cost`` in forward-pass equivalents per example, ``cost_fraction`` of the
    exact single-head sweep's). ``n_boot=0`` leaves the interval NaN.

    The interval is the plain percentile interval. With few examples it is coarse (4 examples
    have 35 distinct resamples) and need not contain the point estimate: a resample repeats
    examples, which shifts statistics such as the layer-normalised ``gradient`` score.
    """
    arrays, heads = _arrays(per_example)
    if reference not in arrays:
        raise ConfigError(
            f"reference measure {reference!r} is not among the measures ({', '.join(arrays)})"
        )
    if n_boot < 0 or not 0 < ci < 1:
        raise ConfigError(f"need n_boot >= 0 and 0 < ci < 1, got n_boot={n_boot}, ci={ci}")
    n_heads, n = len(heads), len(arrays[reference].weights)
    if not 1 <= k <= n_heads:
        raise ConfigError(f"--top-k must be between 1 and the {n_heads} heads compared, got {k}")
    ref = arrays[reference]
    n_layers, per_layer = int(heads["layer"].max()) + 1, int(heads["head"].max()) + 1
    exact = exact_sweep_cost(n_layers, per_layer)
    ones = np.ones((1, n))
    ref_point = ref.scores(ones)
    counts = bootstrap_counts(n, n_boot, seed) if n_boot else None
    ref_boot = ref.scores(counts) if counts is not None else None
    lo, hi = 100 * (1 - ci) / 2, 100 * (1 + ci) / 2
    rows = []
    for name, a in arrays.items():
        if name == reference:
            continue
        point = a.scores(ones)
        rho = float(rank_correlation(point, ref_point)[0])
        low = high = math.nan
        if counts is not None:
            boot = rank_correlation(a.scores(counts), ref_boot)
            boot = boot[~np.isnan(boot)]
            if boot.size:
                low, high = (float(v) for v in np.percentile(boot, [lo, hi]))
        recall, depth = recall_depth(point[0], ref_point[0], k)
        cost = measure_cost(name, n_layers, per_layer)
        checked = np.argsort(-np.nan_to_num(point[0], nan=-np.inf), kind="stable")[:depth]
        search = cost + 1.0 + sum(forward_from(int(ly), n_layers) for ly in a.layers[checked])
        rows.append({
            "measure": name, "metric": a.metric, "reference": reference, "spearman": rho,
            "ci_low": low, "ci_high": high, "topk_overlap": topk_overlap(point[0], ref_point[0], k),
            "recall": recall, "depth": depth, "cost": cost, "cost_fraction": cost / exact,
            "search_fraction": search / exact,
            "k": k, "n_examples": n, "n_heads": n_heads, "n_boot": n_boot,
        })  # fmt: skip
    cols = ["measure", "metric", "reference", "spearman", "ci_low", "ci_high", "topk_overlap",
            "recall", "depth", "cost", "cost_fraction", "search_fraction", "k", "n_examples",
            "n_heads", "n_boot"]  # fmt: skip
    return pd.DataFrame(rows, columns=cols)


def pairwise_agreement(scores: pd.DataFrame, *, k: int = 10) -> pd.DataFrame:
    """All pairs of measures (point estimates, diagonal included) from :func:`measure_scores`:
    ``measure, other, spearman, topk_overlap, k``."""
    wide = scores.pivot(index=["layer", "head"], columns="measure", values="value")
    names = list(dict.fromkeys(scores["measure"]))
    if not 1 <= k <= len(wide):
        raise ConfigError(f"--top-k must be between 1 and the {len(wide)} heads compared, got {k}")
    rows = []
    for a in names:
        for b in names:
            x, y = wide[a].to_numpy(), wide[b].to_numpy()
            rho = float(rank_correlation(x, y)[0])
            rows.append([a, b, rho, topk_overlap(x, y, k), k])
    return pd.DataFrame(rows, columns=["measure", "other", "spearman", "topk_overlap", "k"])
