"""Attention patterns and plausibility vs faithfulness on the real default model (slow, small)."""

from __future__ import annotations

import numpy as np
import pytest

import headlab as hl
from headlab.analyses.attention import (
    attention_map,
    attention_mass,
    attention_mass_scores,
    attention_rollout,
    causal_effects,
    compare_rankings,
)
from headlab.models.load import load_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    return load_model("smollm2-135m")


def test_patterns_and_rollout_of_a_prompt(smol):
    model, tok = smol
    table = attention_map(model, tok, "When Mary and John went to the store, John gave a drink to")
    n = int(table["query"].max()) + 1
    assert len(table) == 30 * 9 * n * (n + 1) // 2
    sums = table.groupby(["layer", "head", "query"])["weight"].sum().to_numpy()
    assert np.allclose(sums, 1.0, atol=1e-4)
    assert " Mary" in set(table["key_token"])
    rollout = attention_rollout(table)
    last = rollout[rollout.layer == 29].groupby("query")["weight"].sum().to_numpy()
    assert np.allclose(last, 1.0, atol=1e-4)
    with pytest.raises(hl.ConfigError, match="context holds 8192"):
        attention_map(model, tok, "word " * 8200)


def test_names_mass_and_exact_effects_of_a_few_heads(smol):
    model, tok = smol
    batch = hl.load_task("names", tok, n=4).eval
    mass = attention_mass(model, batch)
    scores = attention_mass_scores(model, batch)
    assert set(scores["keys"]) == {"answer"} and len(scores) == 270
    per = mass.groupby(["layer", "head"])["value"].mean().to_numpy()
    assert scores["value"].to_numpy() == pytest.approx(per)
    top = scores.sort_values("value", ascending=False).iloc[0]
    heads = [(int(top.layer), int(top["head"])), (0, 0)]
    effects = causal_effects(model, batch, heads=heads)
    plan = hl.Plan.of({heads[0]: hl.Zero()})
    want = hl.evaluate(model, batch, ["logit_diff"], plan=plan)["logit_diff"].mean
    got = effects[(effects.layer == heads[0][0]) & (effects["head"] == heads[0][1])]
    assert float(np.average(got["value"], weights=got["weight"])) == pytest.approx(want, rel=1e-4)
    table, summary = compare_rankings(mass, effects, n_boot=50)
    assert len(table) == 2 and summary.iloc[0].n_examples == 4
