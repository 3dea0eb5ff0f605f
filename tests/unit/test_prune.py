"""Pruning curves against independent computations on a tiny model."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure
from tiny_models import build

import headlab as hl
from headlab.analyses.prune import (
    check_fractions,
    prune_curves,
    prune_plan,
    random_units,
    removable_fraction,
    summarize,
)
from headlab.plots.prune import prune_figure

METHODS = ["zero", "mean", "peak", "resample"]


@pytest.fixture(scope="module")
def setup():
    model = build("llama_gqa")
    gen = torch.Generator().manual_seed(0)
    batch = hl.Batch(input_ids=torch.randint(3, 96, (4, 10), generator=gen))
    stats_batch = hl.Batch(input_ids=torch.randint(3, 96, (8, 10), generator=gen))
    stats = hl.collect_stats(model, stats_batch, config=hl.StatsConfig(bins=50, reservoir=8))
    return model, batch, stats, hl.describe(model)


def direct(model, batch, plan, stats):
    """CE and top-1 from one hooked full forward (no engine)."""
    with torch.no_grad(), hl.intervene(model, plan, stats=stats):
        logits = model(input_ids=batch.input_ids).logits
    return {m: hl.get_metric(m)(logits, batch).mean for m in ("ce", "top1")}


@pytest.mark.parametrize("unit", ["head", "neuron"])
def test_curves_equal_direct_intervene_calls_and_start_at_baseline(setup, unit):
    model, batch, stats, layout = setup
    fr = [0.0, 0.25, 1.0]
    table = prune_curves(
        model, batch, methods=METHODS, unit=unit, fractions=fr, seeds=[3], stats=stats,
        metrics=["ce", "top1"],
    )  # fmt: skip
    assert len(table) == len(METHODS) * 3 * 2
    zero = table[table.fraction == 0]
    assert (zero["delta"] == 0).all() and (zero["value"] == zero["baseline"]).all()
    units = random_units(layout, unit, 3)
    for method in METHODS:
        iv = hl.interventions.intervention_from_name(method)
        for f in (0.25, 1.0):
            n = round(f * 8) if unit == "head" else round(f * layout.n_units) * 2
            want = direct(model, batch, prune_plan(layout, unit, units[:n], iv), stats)
            rows = table[(table.method == method) & (table.fraction == f)].set_index("metric")
            assert rows.loc["ce", "value"] == pytest.approx(want["ce"], rel=1e-5)
            assert rows.loc["top1", "value"] == pytest.approx(want["top1"], abs=1e-6)
            assert rows.loc["ce", "n_pruned"] == n


def test_masks_are_nested_and_per_layer_for_neurons(setup):
    _, _, _, layout = setup
    heads = random_units(layout, "head", 0)
    assert sorted(heads) == layout.heads() and heads != random_units(layout, "head", 1)
    neurons = random_units(layout, "neuron", 0)
    assert len(neurons) == layout.n_layers * layout.n_units
    for k in (1, 5, 13):
        prefix = neurons[: k * layout.n_layers]
        assert [sum(1 for ly, _ in prefix if ly == layer) for layer in range(2)] == [k, k]
    plan = prune_plan(layout, "neuron", neurons[:6], hl.Zero())
    assert sum(len(s.neurons or range(layout.d_head)) for s, _ in plan.entries) == 6


@pytest.mark.parametrize("unit", ["head", "neuron"])
def test_full_mean_ablation_makes_attention_outputs_input_independent(setup, unit):
    model, batch, stats, layout = setup
    plan = prune_plan(layout, unit, random_units(layout, unit, 0), hl.Mean())
    outs = []
    hooks = [p.register_forward_hook(lambda m, a, o: outs.append(o)) for p in layout.out_projs]
    try:
        with torch.no_grad(), hl.intervene(model, plan, stats=stats):
            model(input_ids=batch.input_ids)
    finally:
        for h in hooks:
            h.remove()
    for out in outs:  # [batch, pos, d_model]: one vector everywhere
        assert torch.allclose(out, out[:1, :1].expand_as(out), atol=1e-6)


def test_sweep_order_prunes_least_important_first(setup):
    model, batch, stats, layout = setup
    effects = torch.arange(8.0).flip(0)  # head (1, 3) is least important
    importance = pd.DataFrame(
        {"layer": [ly for ly, _ in layout.heads()], "head": [h for _, h in layout.heads()],
         "method": "zero", "metric": "ce", "effect": effects.tolist()}
    )  # fmt: skip
    table = prune_curves(
        model, batch, methods=["zero", "mean"], orders=["sweep"], fractions=[0.25],
        stats=stats, importance=importance, metrics=["ce"],
    )  # fmt: skip
    row = table[(table.method == "zero") & (table.fraction == 0.25)]
    want = direct(model, batch, hl.Plan.heads([(1, 3), (1, 2)], hl.Zero()), stats)["ce"]
    assert float(row["value"].iloc[0]) == pytest.approx(want, rel=1e-5)
    assert set(table["ranked_by"]) == {"sweep:zero/ce"}  # mean falls back to the zero rows
    with pytest.raises(hl.ConfigError, match="every head"):
        prune_curves(model, batch, orders=["sweep"], importance=importance.head(5), stats=stats)


def test_iterative_order_starts_with_the_least_harmful_single_heads(setup):
    model, batch, _, _ = setup
    table = prune_curves(
        model, batch, methods=["zero"], orders=["iterative"], fractions=[0.25, 0.5],
        metrics=["ce"],
    )  # fmt: skip
    singles = hl.sweep(model, batch, methods=["zero"], metrics=["ce"])
    best = singles.sort_values(["effect", "layer", "head"]).head(2)
    heads = list(zip(best["layer"], best["head"], strict=True))
    want = direct(model, batch, hl.Plan.heads(heads, hl.Zero()), None)
    got = table[table.fraction == 0.25]["value"].iloc[0]
    assert float(got) == pytest.approx(want["ce"], rel=1e-5)
    assert table[table.fraction == 0.5]["n_pruned"].iloc[0] == 4


def synthetic(effects_by_seed):
    rows = []
    for seed, effects in enumerate(effects_by_seed):
        for f, e in zip([0.0, 0.5, 1.0], effects, strict=True):
            rows.append({"order": "random", "seed": seed, "method": "zero", "unit": "head",
                         "fraction": f, "n_pruned": int(8 * f), "metric": "ce", "value": 3 + e,
                         "baseline": 3.0, "delta": e, "effect": e, "ranked_by": "r"})  # fmt: skip
    return pd.DataFrame(rows)


def test_summary_and_removable_fraction():
    table = synthetic([[0, 0.1, 2.0], [0, 0.3, 4.0]])
    s = summarize(table)
    half = s[s.fraction == 0.5].iloc[0]
    assert half["delta"] == pytest.approx(0.2) and half["n_seeds"] == 2
    assert half["delta_sd"] == pytest.approx(pd.Series([0.1, 0.3]).std())
    r = removable_fraction(table, 0.25).iloc[0]
    assert r["fraction"] == 0.5 and r["next_fraction"] == 1.0 and r["next_effect"] == 3.0
    assert removable_fraction(table, 0.1).iloc[0]["fraction"] == 0.0
    with pytest.raises(hl.ConfigError, match="raise --tolerance"):
        removable_fraction(table, 0.1, strict=True)
    with pytest.raises(hl.ConfigError, match="tolerance must be"):
        removable_fraction(table, -1)
    assert isinstance(prune_figure(summarize(table)), Figure)


def test_bad_input(setup):
    model, batch, _, _ = setup
    for bad in ([0.5, 1.5], [-0.1], ["a"]):
        with pytest.raises(hl.ConfigError, match=r"in \[0, 1\]"):
            check_fractions(bad)
    assert check_fractions([1, 0.5]) == [0.0, 0.5, 1.0]
    with pytest.raises(hl.ConfigError, match="unit='head'"):
        prune_curves(model, batch, unit="neuron", orders=["iterative"])
    with pytest.raises(hl.ConfigError, match="needs a sweep table"):
        prune_curves(model, batch, orders=["sweep"])
    with pytest.raises(hl.ConfigError, match="statistics"):
        prune_curves(model, batch, methods=["mean"])
    with pytest.raises(hl.ConfigError, match="unknown pruning order"):
        prune_curves(model, batch, orders=["magnitude"])
