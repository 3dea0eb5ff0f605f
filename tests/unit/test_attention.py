"""Attention patterns, rollout and plausibility vs faithfulness against independent oracles:
Hugging Face ``output_attentions``, explicit matrix products, hand sums, direct ``intervene`` runs,
closed-form Spearman, and the ground-truth induction model's known circuit."""

from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest
import tiny_models as T
import torch
from fixtures import ground_truth as gt
from matplotlib.figure import Figure

import headlab as hl
from headlab.analyses.attention import (
    MassPart,
    attention_map,
    attention_mass,
    attention_mass_scores,
    attention_rollout,
    causal_effects,
    compare_rankings,
    effect_parts,
    key_mask,
    plausibility_faithfulness,
    prompt_batch,
    query_mask,
    require_keys,
)
from headlab.parts import Context
from headlab.plots.attention import (
    attention_grid_figure,
    attention_head_figure,
    faithfulness_figure,
    rollout_figure,
)


def hf_attentions(model, ids):
    """The oracle: Hugging Face's own eager attention probabilities, [layer][batch, head, q, k]."""
    old = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            return model(input_ids=ids, output_attentions=True).attentions
    finally:
        model.set_attn_implementation(old)


@pytest.mark.parametrize("name", ["llama_gqa", "gpt2", "bert"])
def test_map_equals_hugging_face_attentions(name):
    model = T.build(name)
    ids = T.inputs(name, batch=2)["input_ids"]
    table = attention_map(model, None, hl.Batch(input_ids=ids), example=1)
    want = hf_attentions(model, ids)
    n_layers, n_heads, seq = len(want), want[0].shape[1], ids.shape[1]
    causal = name != "bert"
    assert len(table) == n_layers * n_heads * (seq * (seq + 1) // 2 if causal else seq * seq)
    got = table.set_index(["layer", "head", "query", "key"])["weight"]
    for ly in range(n_layers):
        for h in range(n_heads):
            for q in range(seq):
                for k in range(q + 1 if causal else seq):
                    oracle = float(want[ly][1, h, q, k])
                    assert got[(ly, h, q, k)] == pytest.approx(oracle, abs=1e-6)
    sums = table.groupby(["layer", "head", "query"])["weight"].sum()
    assert np.allclose(sums.to_numpy(), 1.0, atol=1e-5)
    assert table["key_token"].iloc[0] == f"<{int(ids[1, 0])}>"  # labelled by id without tokenizer
    assert model.config._attn_implementation == "sdpa"


def test_rollout_equals_the_explicit_product_on_a_two_layer_model():
    model = T.build("llama_gqa")
    ids = T.inputs("llama_gqa", batch=1)["input_ids"]
    att = hf_attentions(model, ids)
    eye = torch.eye(ids.shape[1], dtype=torch.float64)
    a1 = 0.5 * att[0][0].double().mean(0) + 0.5 * eye
    a2 = 0.5 * att[1][0].double().mean(0) + 0.5 * eye
    rollout = attention_rollout(attention_map(model, None, hl.Batch(input_ids=ids)))
    for layer, want in ((0, a1), (1, a2 @ a1)):
        sub = rollout[rollout.layer == layer]
        got = np.zeros(want.shape)
        got[sub["query"], sub["key"]] = sub["weight"]
        assert np.allclose(got, want.numpy(), atol=1e-6)
        assert np.allclose(got.sum(1), 1.0, atol=1e-6)  # rollout rows stay distributions
    with pytest.raises(hl.ConfigError, match="full attention_map"):
        table = attention_map(model, None, hl.Batch(input_ids=ids))
        attention_rollout(table[table["head"] != 2])


def test_prompt_tokens_label_the_table_and_the_figures():
    model, tok = gt.load()
    table = attention_map(model, tok, "t3 t5 t7 t3")
    row = table[(table.layer == 0) & (table["head"] == 0) & (table["query"] == 4)]
    assert list(row["key_token"]) == ["<bos>", "t3", "t5", "t7", "t3"]
    fig = attention_head_figure(table, 1, 1)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["<bos>", "t3", "t5", "t7", "t3"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["<bos>", "t3", "t5", "t7", "t3"]
    roll = rollout_figure(attention_rollout(table))
    assert [t.get_text() for t in roll.axes[0].get_xticklabels()][-1] == "t3"
    grid = attention_grid_figure(table, layers=[1], heads=[1, 3])
    assert isinstance(grid, Figure) and len(grid.axes) == 2 + 1  # two panels and a colourbar
    assert [t.get_text() for t in grid.axes[0].get_xticklabels()][1] == "t3"
    with pytest.raises(hl.ConfigError, match="not in the table"):
        attention_grid_figure(table, layers=[5])


def test_a_prompt_longer_than_the_context_is_refused():
    model, tok = gt.load()  # max_position_embeddings = 128
    with pytest.raises(hl.ConfigError, match=r"129 tokens but the model's context holds 128"):
        attention_map(model, tok, " ".join(["t3"] * 128))
    with pytest.raises(hl.ConfigError, match="shorten it"):
        prompt_batch(tok, " ".join(["t4"] * 200), model=model)
    tiny = T.build("llama_gqa")  # 64 positions
    long = hl.Batch(input_ids=torch.randint(3, 90, (2, 70)))
    with pytest.raises(hl.ConfigError, match="70 tokens"):
        attention_mass(tiny, long, keys="context")
    with pytest.raises(hl.ConfigError, match="prompt is empty"):
        prompt_batch(tok, "  ", model=model)


def answer_batch():
    """A names-like batch: the correct token (7) appears once, the wrong one (9) twice."""
    ids = torch.tensor(
        [[1, 7, 20, 9, 30, 31, 9, 40, 41, 42], [1, 9, 21, 7, 33, 34, 9, 43, 44, 45]]
    )  # [batch, pos]
    return hl.Batch(
        input_ids=ids,
        target_mask=torch.zeros_like(ids, dtype=torch.bool),
        answer_pos=torch.tensor([9, 9]),
        correct=torch.tensor([7, 7]),
        wrong=torch.tensor([9, 9]),
    )


def test_mass_equals_a_manual_sum_of_hugging_face_weights():
    model = T.build("llama_gqa")
    batch = answer_batch()
    att = hf_attentions(model, batch.input_ids)
    for keys, where in (("answer", [[1], [3]]), ("wrong", [[3, 6], [1, 6]])):
        got = attention_mass(model, batch, keys=keys).set_index(["example", "layer", "head"])
        for b in range(2):
            for ly in range(2):
                for h in range(4):
                    want = float(att[ly][b, h, 9, where[b]].sum())
                    assert got.loc[(b, ly, h), "value"] == pytest.approx(want, abs=1e-6)
    part = MassPart("wrong")
    assert pickle.loads(pickle.dumps(part)) == part and part.key == "mass"
    ctx = Context(model, hl.describe(model), batch)
    pd.testing.assert_frame_equal(part.run(ctx), attention_mass(model, batch, keys="wrong"))
    with pytest.raises(hl.ConfigError, match="no example has a key to measure"):
        require_keys(attention_mass(model, batch, queries=torch.zeros(2, 10, dtype=torch.bool)))
    scores = attention_mass_scores(model, batch)
    assert list(scores.columns[:3]) == ["layer", "head", "value"] and set(scores["keys"]) == {
        "answer"
    }
    want = np.mean([float(att[1][b, 2, 9, [1, 3][b]]) for b in range(2)])
    assert scores.set_index(["layer", "head"]).loc[(1, 2), "value"] == pytest.approx(want)
    # context: from q onto 1..q-1, averaged over the scored queries of a token batch
    ids = torch.randint(3, 90, (1, 8), generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(1, 8, dtype=torch.bool)
    mask[0, 5:] = True  # tokens 5..7 scored: queries 4..6
    tokens = hl.Batch(input_ids=ids, target_mask=mask)
    assert query_mask(tokens)[0].nonzero().flatten().tolist() == [4, 5, 6]
    att = hf_attentions(model, ids)
    got = attention_mass(model, tokens, keys="context").set_index(["layer", "head"])["value"]
    want = np.mean([float(att[0][0, 3, q, 1:q].sum()) for q in (4, 5, 6)])
    assert got[(0, 3)] == pytest.approx(want, abs=1e-6)


def test_key_sets_follow_their_definitions():
    ids = torch.tensor([[0, 5, 6, 7, 5, 6, 7]])
    batch = hl.Batch(input_ids=ids, target_mask=torch.ones_like(ids, dtype=torch.bool))
    pairs, rule = key_mask(batch)  # auto: a repeated segment
    assert rule == "induction"
    assert pairs[0, 4].nonzero().flatten().tolist() == [2]  # 5 at q=4 -> token after earlier 5
    assert pairs[0, 6].nonzero().flatten().tolist() == [4]  # 7 at q=6 -> token after earlier 7
    assert pairs[0, 3].nonzero().numel() == 0
    prev, _ = key_mask(batch, "previous")
    assert prev[0, 5].nonzero().flatten().tolist() == [4]
    _, tok = gt.load()
    words, _ = key_mask(hl.Batch(input_ids=torch.tensor([tok("t3 t5 t3")["input_ids"]])), "words",
                        words=["t3"], tokenizer=tok)  # fmt: skip
    assert words[0, 3].nonzero().flatten().tolist() == [1, 3]
    pos, _ = key_mask(batch, "positions", positions=[1, -1])
    assert pos[0, 6].nonzero().flatten().tolist() == [1, 6]
    assert pos[0, 2].nonzero().flatten().tolist() == [1]  # never past the query
    with pytest.raises(hl.ConfigError, match="choose from"):
        key_mask(batch, "everything")
    with pytest.raises(hl.ConfigError, match="task batch"):
        key_mask(batch, "answer")
    with pytest.raises(hl.ConfigError, match="occurs in no prompt"):
        key_mask(batch, "words", words=["t9"], tokenizer=tok)


def per_example_metric(model, batch, plan, metric):
    with torch.no_grad(), hl.intervene(model, plan):
        logits = model(**batch.model_inputs()).logits
    return hl.get_metric(metric)(logits, batch).per_example.double()


def test_causal_column_equals_direct_intervene_runs():
    model = T.build("llama_gqa")
    batch = answer_batch()
    table = causal_effects(model, batch, method="zero", batch_size=1)  # default: logit_diff
    assert set(table["metric"]) == {"logit_diff"} and len(table) == 2 * 2 * 4
    clean = per_example_metric(model, batch, hl.Plan(), "logit_diff")
    for ly, h in [(0, 1), (1, 3)]:
        want = per_example_metric(model, batch, hl.Plan.of({(ly, h): hl.Zero()}), "logit_diff")
        rows = table[(table.layer == ly) & (table["head"] == h)].sort_values("example")
        assert rows["value"].to_numpy() == pytest.approx(want.numpy(), abs=1e-5)
        assert rows["effect"].to_numpy() == pytest.approx((clean - want).numpy(), abs=1e-5)
    # patching from a counterfactual: the same as intervening with Patch(record(counterfactual))
    other = hl.Batch(input_ids=batch.input_ids.flip(0))
    table = causal_effects(model, batch, method="patch", counterfactual=other, heads=[(1, 0)])
    patch = hl.Patch(hl.record(model, other.model_inputs()))
    want = per_example_metric(model, batch, hl.Plan.of({(1, 0): patch}), "logit_diff")
    assert table.sort_values("example")["value"].to_numpy() == pytest.approx(want.numpy(), abs=1e-5)
    assert set(table["method"]) == {"patch"}
    with pytest.raises(hl.ConfigError, match="counterfactual"):
        causal_effects(model, batch, method="patch")
    # the per-layer parts: picklable values whose tables, concatenated, are the same effects
    parts = effect_parts(hl.describe(model), batch, method="zero")
    assert [p.key for p in parts] == ["effect-L000", "effect-L001"]
    assert pickle.loads(pickle.dumps(parts)) == parts and parts[0].metric == "logit_diff"
    ctx = Context(model, hl.describe(model), batch, batch_size=1)
    got = pd.concat([p.run(ctx) for p in parts], ignore_index=True)
    pd.testing.assert_frame_equal(got, causal_effects(model, batch, method="zero", batch_size=1))
    with pytest.raises(hl.ConfigError, match="statistics"):
        causal_effects(model, batch, method="mean")


def fake_tables(mass_values, effect_values, n_examples=4):
    """Per-example tables where every example has the same per-head values."""
    heads = [(ly, h) for ly in range(2) for h in range(len(mass_values) // 2)]
    mass, eff = [], []
    for ex in range(n_examples):
        for (ly, h), m, e in zip(heads, mass_values, effect_values, strict=True):
            mass.append({"example": ex, "layer": ly, "head": h, "value": m, "keys": "answer"})
            eff.append({"example": ex, "layer": ly, "head": h, "method": "zero",
                        "metric": "logit_diff", "value": 3.0 - e, "baseline": 3.0, "delta": -e,
                        "weight": 1.0, "effect": e})  # fmt: skip
    return pd.DataFrame(mass), pd.DataFrame(eff)


def test_spearman_ci_and_overlap_on_known_inputs():
    mass, eff = fake_tables([0.9, 0.5, 0.1, 0.3, 0.2, 0.05], [2.0, -1.0, 0.1, 0.5, 0.3, 0.0])
    table, summary = compare_rankings(mass, eff, n_boot=50, top_k=2)
    s = summary.iloc[0]
    assert s.spearman == pytest.approx(1.0) and s.ci_low == s.ci_high == pytest.approx(1.0)
    assert s.top_k_overlap == 2 and s.chance_overlap == pytest.approx(4 / 6)
    row = table.set_index(["layer", "head"]).loc[(0, 1)]
    assert row.abs_effect == 1.0 and row.delta == 1.0 and row.value == pytest.approx(4.0)
    assert row.plausibility_rank == 2 and row.faithfulness_rank == 2
    # closed form: rho = 1 - 6 sum d^2 / (n (n^2 - 1)); ranks of mass 1..6 vs a permutation
    mass, eff = fake_tables([6, 5, 4, 3, 2, 1], [3, 6, 5, 1, 2, 4])
    _, summary = compare_rankings(mass, eff, n_boot=0)
    d = np.array([1, 2, 3, 4, 5, 6]) - np.array([4, 1, 2, 6, 5, 3])
    assert summary.iloc[0].spearman == pytest.approx(1 - 6 * (d**2).sum() / (6 * 35))
    assert np.isnan(summary.iloc[0].ci_low)
    # examples disagree: the bootstrap interval is wide and contains the point estimate
    mass, eff = fake_tables([6, 5, 4, 3, 2, 1], [1, 2, 3, 4, 5, 6], n_examples=6)
    flip = eff.example >= 4  # two of six examples rank the heads the other way round
    eff.loc[flip, "effect"] = 7 - eff.loc[flip, "effect"]
    table, summary = compare_rankings(mass, eff, n_boot=400, seed=1)
    s = summary.iloc[0]
    assert s.spearman == pytest.approx(-1.0)  # mean effect (2e + 14) / 6 still rises with e
    assert s.ci_low == pytest.approx(-1.0) and s.ci_high == pytest.approx(1.0)
    fig = faithfulness_figure(table, summary, label_top=2)
    # effects of only some heads: compared on those heads alone
    mass, eff = fake_tables([0.9, 0.5, 0.1, 0.3, 0.2, 0.05], [2.0, -1.0, 0.1, 0.5, 0.3, 0.0])
    some = eff[((eff.layer == 0) & (eff["head"] == 2)) | ((eff.layer == 1) & (eff["head"] < 2))]
    sub, sub_summary = compare_rankings(mass, some, n_boot=10)
    assert list(zip(sub.layer, sub["head"], strict=True)) == [(0, 2), (1, 0), (1, 1)]
    assert list(sub.faithfulness_rank) == [3, 1, 2] and sub_summary.iloc[0].n_heads == 3
    assert "Spearman" in fig.axes[0].get_title() and len(fig.axes[0].texts) >= 2


def test_ground_truth_induction_heads_look_and_matter_but_the_prev_token_head_only_matters():
    model, _ = gt.load()
    batch, _ = gt.induction(16)
    res = plausibility_faithfulness(model, batch, n_boot=100, top_k=3)
    table = res.table.set_index(["layer", "head"])
    assert set(res.top("plausibility", 2)) == set(gt.INDUCTION)
    assert set(res.mass["keys"]) == {"induction"}
    for h in gt.INDUCTION:
        assert table.loc[h, "plausibility"] > 0.7
    # signed effect (ablating hurts): the whole circuit ranks top, both induction heads in it
    by_effect = table.sort_values("effect", ascending=False).index[:3]
    assert set(by_effect) == set(gt.CIRCUIT)
    assert res.top("faithfulness", 1) == gt.PREVIOUS  # most causal, yet it never looks there
    assert table.loc[gt.PREVIOUS[0], "plausibility"] < 0.01
    assert res.summary.iloc[0].spearman < 0.5  # plausible is not faithful


def test_the_bias_corrected_interval_undoes_a_known_bootstrap_shift():
    from headlab.analyses.ranking import bc_interval

    rng = np.random.default_rng(0)
    point, sd, z = 0.3, 0.05, 1.959963984540054
    centred = point + sd * rng.normal(size=200_000)
    lo, hi = bc_interval(centred, point, 0.95)  # no bias: the percentile interval
    assert (lo, hi) == pytest.approx((point - z * sd, point + z * sd), abs=2e-3)
    shifted = centred - 0.02  # resampling pulled every value down by b = 0.02
    lo, hi = bc_interval(shifted, point, 0.95)  # normal theory: point + b -+ z sd
    assert (lo, hi) == pytest.approx((point + 0.02 - z * sd, point + 0.02 + z * sd), abs=3e-3)
    assert np.isnan(bc_interval(np.array([np.nan]), point, 0.95)[0])
