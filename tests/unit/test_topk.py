"""The top-k search: its racing rule on a synthetic "model" with known effects (the error rate stays
within the confidence, and a too-loose rule fails the same check), and on tiny models (the answer
equals the full sweep's top k; heads evaluated on every example have the sweep's numbers)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from oracles import edited
from tiny_models import VOCAB, build

import headlab as hl
import headlab.analyses.topk.race as race_module
from headlab.analyses.sweep import sweep
from headlab.analyses.topk import RaceRule, race_top_k, schedule, serfling_width, top_k
from headlab.errors import ConfigError

# -- a synthetic model: per-head, per-example effects from known distributions -------------------


def population(seed: int, *, n_heads: int = 100, n_examples: int = 32, k: int = 5) -> np.ndarray:
    """``[head, example]`` effects: heavy-tailed importance (a few large heads, a crowd of 30 near
    the k-th, many near zero, signs mixed), examples correlated through a shared per-example
    factor, Student-t noise, and an exact tie at the k-th head."""
    rng = np.random.default_rng(seed)
    crowd = 30
    big = 1.5 + rng.pareto(1.0, k - 2)
    near = rng.uniform(0.6, 1.0, crowd)
    small = np.abs(rng.standard_cauchy(n_heads - crowd - (k - 2))) * 0.02
    mu = np.concatenate([big, near, small]) * rng.choice([-1, 1], n_heads, p=[0.3, 0.7])
    rng.shuffle(mu)
    shared = rng.lognormal(0, 0.5, n_examples)
    shared /= shared.mean()  # how sensitive each example is, for every head at once
    noise = (0.5 if seed % 2 else 1.0) * (0.3 + np.abs(mu))
    z = mu[:, None] * shared[None, :] + noise[:, None] * rng.standard_t(4, (n_heads, n_examples))
    order = np.argsort(-np.abs(z.mean(1)), kind="stable")
    z[order[k]] = z[order[k - 1]]  # an exact tie at the k-th place
    return z


def truth(z: np.ndarray, k: int) -> set[int]:
    """The full sweep's top k by |mean|, exact ties broken by index (lower first)."""
    key = np.abs(z.mean(1))
    idx = np.arange(len(key))
    return set(idx[np.lexsort((idx, -key))][:k].tolist())


def error_rate(trials: int = 200, k: int = 5) -> tuple[float, float]:
    """Share of seeded trials whose answer is not the true top k, and the mean cost (fraction of
    the full sweep's evaluations)."""
    errors, costs = [], []
    for seed in range(trials):
        z = population(seed, k=k)
        n_heads, n_examples = z.shape
        rule = RaceRule(k=k, confidence=0.95, seed=seed)
        res = race_top_k(
            lambda heads, ex, z=z: z[heads][:, ex][..., None], n_heads, n_examples, 1, rule
        )
        assert res.guaranteed[0] and res.selected[:, 0].sum() == k
        errors.append(set(np.flatnonzero(res.selected[:, 0]).tolist()) != truth(z, k))
        costs.append(res.evaluations / (n_heads * n_examples))
    return float(np.mean(errors)), float(np.mean(costs))


def test_error_rate_over_200_trials_stays_within_the_confidence():
    rate, cost = error_rate()
    assert rate <= 0.05
    assert cost < 0.8  # and it saves work: most heads stop early


def test_a_too_loose_rule_fails_the_same_check(monkeypatch):
    """Per-head 95 % normal intervals with no union bound (what one would write naively): the
    same 200 trials then return a wrong top k more often than 5 % of the time."""

    def naive(n, n_examples, sd, span, delta):
        n = np.asarray(n, dtype=float)
        fpc = np.sqrt(np.clip(1 - n / n_examples, 0, 1))
        return np.where(n >= n_examples, 0.0, 1.96 * sd / np.sqrt(np.maximum(n - 1, 1)) * fpc)

    monkeypatch.setattr(race_module, "serfling_width", naive)
    rate, _ = error_rate()
    assert rate > 0.05


def test_interval_width_matches_the_bound_and_vanishes_on_the_whole_population():
    n_examples, delta = 32, 1e-4
    sd, span = np.array([0.0]), np.array([1.0])  # sd 0: the Hoeffding part decides
    n = np.array([4])
    rho = 1 - 3 / 32
    hoeffding = math.sqrt(rho * math.log(2 / delta) / 8)
    assert serfling_width(n, n_examples, sd, span, delta)[0] == pytest.approx(hoeffding)
    widths = serfling_width(np.array([2, 4, 8, 16, 24, 31, 32]), n_examples, sd, span, delta)
    assert np.all(np.diff(widths) < 0) and widths[-1] == 0.0
    assert schedule(32, 4, 2) == [4, 8, 16, 32] and schedule(20, 4, 2) == [4, 8, 16, 20]


def test_an_exact_tie_at_the_kth_head_goes_to_the_lower_index():
    rng = np.random.default_rng(0)
    z = np.abs(rng.normal(0.01, 0.005, (12, 16)))
    z[3] = 1.0 + rng.normal(0, 0.1, 16)  # the clear first
    z[9] = z[5] = 0.5 + rng.normal(0, 0.1, 16)  # tied for second with k = 2
    res = race_top_k(lambda h, ex: z[h][:, ex][..., None], 12, 16, 1, RaceRule(k=2, seed=1))
    assert set(np.flatnonzero(res.selected[:, 0])) == {3, 5}
    assert res.n[5] == res.n[9] == 16  # only the exact values could break the tie
    assert res.status[9, 0] == "eliminated" and res.status[5, 0] == "top-k"


@pytest.mark.parametrize("direction", ["hurts", "helps"])
def test_signed_directions_follow_the_sweeps_effect(direction):
    """Metric where higher is better (sign -1): effect = -delta; hurts ranks by effect."""
    z = np.zeros((6, 8))
    z[0], z[1], z[2] = -2.0, 3.0, -1.0  # deltas; effects 2, -3, 1
    res = race_top_k(
        lambda h, ex: z[h][:, ex][..., None], 6, 8, 1,
        RaceRule(k=1, direction=direction, leaders=0), signs=[-1.0],
    )  # fmt: skip
    assert np.flatnonzero(res.selected[:, 0]).tolist() == ([0] if direction == "hurts" else [1])


def test_a_spent_budget_reports_undecided_heads_and_how_many_examples_would_decide():
    z = population(3)
    res = race_top_k(
        lambda h, ex: z[h][:, ex][..., None], *z.shape, 1,
        RaceRule(k=5, max_cost=0.2, seed=3),
    )  # fmt: skip
    und = res.status[:, 0] == "undecided"
    assert und.any() and not res.guaranteed[0] and res.selected[:, 0].sum() == 5
    assert res.evaluations <= 0.2 * z.size
    assert np.all(res.n_needed[und, 0] > res.n[und]) and np.all(res.n_needed[und, 0] <= 32)
    assert np.all(res.n_needed[~und, 0] == 0)


@pytest.mark.parametrize(
    ("rule", "sizes", "message"),
    [
        (RaceRule(k=13), (12, 32), "--top-k 13 asks for more heads than the 12"),
        (RaceRule(k=0), (12, 32), "--top-k must be a positive integer"),
        (RaceRule(k=2, confidence=1.0), (12, 32), "strictly between 0 and 1"),
        (RaceRule(k=2, confidence=0), (12, 32), "strictly between 0 and 1"),
        (RaceRule(k=2, direction="up"), (12, 32), "--direction must be one of abs, hurts"),
        (RaceRule(k=2), (12, 4), "too few examples to decide anything"),
        (RaceRule(k=2, max_cost=1.5), (12, 32), "--max-cost"),
    ],
)
def test_bad_rules_are_refused_with_the_fix(rule, sizes, message):
    with pytest.raises(ConfigError, match=message):
        rule.check(*sizes)


# -- tiny models: the answer is the full sweep's top k ---------------------------------------------


def _batch(n: int = 16, seq: int = 12, seed: int = 0) -> hl.Batch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, seq), generator=g)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[:, 0] = False
    return hl.Batch(input_ids=ids, target_mask=mask)


def _sweep_top(full, k: int, direction: str = "abs") -> set[tuple[int, int]]:
    key = {"abs": full["delta"].abs(), "hurts": full["effect"], "helps": -full["effect"]}
    ranked = full.assign(key=key[direction]).sort_values("key", ascending=False, kind="stable")
    return {(int(r.layer), int(r.head)) for r in ranked.head(k).itertuples()}


def _skewed(family: str) -> torch.nn.Module:
    """A tiny model whose heads matter very unequally (as in trained models): every head's output
    projection scaled by 0.02, except three heads left at 1 or scaled by 3."""
    model = build(family)
    lay = hl.describe(model)
    edits = [(ly, h, "scale", 0.02) for ly in range(lay.n_layers) for h in range(lay.n_heads)]
    edits[1], edits[4] = (0, 1, "scale", 3.0), (1, 0, "scale", 1.0)
    edits[-2] = (lay.n_layers - 1, lay.n_heads - 2, "scale", 3.0)
    return edited(model, edits)


@pytest.mark.parametrize("family", ["gpt2", "llama_gqa", "gpt_neox", "qwen2", "opt"])
def test_top_k_equals_the_full_sweeps_top_k_on_tiny_models(family):
    model, batch = _skewed(family), _batch(n=32)
    full = sweep(model, batch, methods=["zero"], metrics=["ce"])
    for k, leaders in [(2, None), (3, 0)]:
        found = top_k(model, batch, k=k, methods=["zero"], metrics=["ce"], leaders=leaders)
        got = found.table
        assert {(int(r.layer), int(r.head)) for r in got[got.in_top_k].itertuples()} == (
            _sweep_top(full, k)
        )
        both = full.merge(got, on=["layer", "head", "method", "metric"], suffixes=("", "_k"))
        exact = both[both.n_k == len(batch)]
        assert len(exact) >= k
        for col in ("value", "baseline", "delta", "effect", "delta_sd"):
            np.testing.assert_allclose(exact[f"{col}_k"], exact[col], atol=1e-6, rtol=0)
        np.testing.assert_allclose(exact["lo"], exact["delta_k"], atol=1e-9, rtol=0)
        assert (exact["lo"] == exact["hi"]).all()  # exact: a zero-width interval
        inside = both[both.n_k < len(batch)]  # the intervals of heads stopped early hold
        assert ((inside["lo"] <= inside["delta"]) & (inside["delta"] <= inside["hi"])).all()
        if leaders is None:  # with an exact bar the small heads stop after 4 examples
            assert found.summary["zero/ce"]["statistical"] and (got.n < len(batch)).sum() >= 3
            assert found.cost["fraction"] < 1


def test_resample_and_signed_ranking_match_the_sweep():
    """Resample picks donors by each example's place in the whole batch, also on a random
    subset of examples; ``hurts`` ranks by the sweep's effect."""
    model, batch = build("llama_gqa"), _batch(seed=2)
    stats = hl.collect_stats(model, _batch(seed=3), config=hl.StatsConfig(reservoir=4))
    full = sweep(model, batch, methods=["resample"], metrics=["ce"], stats=stats, batch_size=4)
    found = top_k(
        model, batch, k=2, methods=["resample"], metrics=["ce"], stats=stats, batch_size=4,
        direction="hurts", leaders=0,
    )  # fmt: skip
    got = found.table
    assert {(int(r.layer), int(r.head)) for r in got[got.in_top_k].itertuples()} == (
        _sweep_top(full, 2, "hurts")
    )
    both = full.merge(got, on=["layer", "head", "method", "metric"], suffixes=("", "_k"))
    exact = both[both.n_k == len(batch)]
    assert len(exact) >= 2
    np.testing.assert_allclose(exact["delta_k"], exact["delta"], atol=1e-6, rtol=0)


def test_search_reports_its_cost_against_the_full_sweep():
    model, batch = build("gpt2"), _batch(n=16)
    found = top_k(model, batch, k=1, methods=["zero", "scale:2"], metrics=["ce", "top1"])
    n_heads, tokens = 8, batch.seq_len
    assert found.cost["sweep_evaluations"] == 2 * n_heads * len(batch)
    assert found.cost["sweep_tokens"] == (2 * n_heads * len(batch) + len(batch)) * tokens
    assert found.cost["evaluations"] == found.table.groupby("method")["n"].sum().sum() / 2
    assert set(found.summary) == {"zero/ce", "zero/top1", "scale:2/ce", "scale:2/top1"}
    for s in found.summary.values():
        assert len(s["top"]) == 1 and s["guaranteed"]
