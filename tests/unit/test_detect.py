"""Head detectors: TransformerLens patterns and scores against hand-computed values, eager
attention switching, and the table on tiny models."""

from __future__ import annotations

import pickle

import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure
from tiny_models import build

import headlab as hl
from headlab.analyses.detect import (
    DetectPart,
    detect_heads,
    detection_pattern,
    diagonal_score,
    pattern_score,
    repeat_period,
    top_heads,
)
from headlab.models.attention import attention_patterns, eager_attention
from headlab.parts import Context
from headlab.plots.detect import detect_figure


def perfect_induction(t: int, *, park_on_bos: bool) -> torch.Tensor:
    """[BOS] r r with |r| = t: every second-half query attends to the token after its earlier
    copy; first-half queries attend to BOS (or to themselves)."""
    n = 2 * t + 1
    a = torch.zeros(n, n)
    for q in range(n):
        if q > t:
            a[q, q - t + 1] = 1.0
        elif park_on_bos:
            a[q, 0] = 1.0
        else:
            a[q, q] = 1.0
    return a


def test_detection_patterns_follow_transformer_lens():
    ids = torch.tensor([5, 7, 9, 5, 7])
    prev = detection_pattern("previous_token", ids)
    assert torch.equal(prev, torch.diag(torch.ones(4), -1))
    dup = detection_pattern("duplicate_token", ids)
    want = torch.zeros(5, 5)
    want[3, 0] = want[4, 1] = 1  # tok[3] == tok[0], tok[4] == tok[1]; only s < t
    assert torch.equal(dup, want)
    ind = detection_pattern("induction", ids)
    want = torch.zeros(5, 5)
    want[3, 1] = want[4, 2] = 1  # one column right of the duplicate
    assert torch.equal(ind, want)
    batched = detection_pattern("induction", torch.stack([ids, ids.flip(0)]))
    assert batched.shape == (2, 5, 5) and torch.equal(batched[0], ind)


@pytest.mark.parametrize("t", [10, 50])
def test_perfect_heads_score_the_documented_values(t):
    ids = torch.cat([torch.tensor([0]), torch.arange(1, t + 1), torch.arange(1, t + 1)])
    pat = detection_pattern("induction", ids)
    a = perfect_induction(t, park_on_bos=True)
    assert float(pattern_score(a, pat)) == pytest.approx(t / (2 * t + 1))
    assert float(pattern_score(a, pat, exclude_bos=True)) == pytest.approx(1.0)
    # the diagonal also passes row t - 1 -> key 0 (BOS): (t + 1) / (t + 2) when parking there
    assert float(diagonal_score(a, t - 1)) == pytest.approx((t + 1) / (t + 2))
    selfish = perfect_induction(t, park_on_bos=False)
    assert float(diagonal_score(selfish, t - 1)) == pytest.approx(t / (t + 2))
    n = 2 * t + 1
    prev = torch.diag(torch.ones(n - 1), -1)
    prev[0, 0] = 1.0
    score = pattern_score(prev, detection_pattern("previous_token", ids))
    assert float(score) == pytest.approx((n - 1) / n)
    # "abs": 1 - sum |A - P| / n; the perfect previous-token head misses only row 0
    assert float(pattern_score(prev, detection_pattern("previous_token", ids), measure="abs")) == (
        pytest.approx(1 - 1 / n)
    )
    cur = pattern_score(torch.eye(n), detection_pattern("previous_token", ids))
    assert float(cur) == 0.0
    assert float(pattern_score(torch.eye(n) * 0.5 + prev * 0.5, prev, exclude_current_token=True))


def test_repeat_period():
    r = torch.randperm(20)[:8]
    ids = torch.cat([torch.tensor([99]), r, r])[None].repeat(3, 1)
    assert repeat_period(ids) == 8
    assert repeat_period(torch.arange(12)[None]) is None


def test_eager_attention_is_restored_even_on_error():
    model = build("llama_gqa")
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(RuntimeError), eager_attention(model):
        assert model.config._attn_implementation == "eager"
        raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("name", ["llama_gqa", "gpt2"])
def test_patterns_are_causal_distributions_and_leave_the_model_unchanged(name):
    model = build(name)
    ids = torch.randint(3, 96, (3, 10), generator=torch.Generator().manual_seed(0))
    batch = hl.Batch(input_ids=ids)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    [(start, attn)] = list(attention_patterns(model, batch))
    assert start == 0 and attn.shape == (2, 3, 4, 10, 10)  # [layer, batch, head, q, k]
    assert torch.allclose(attn.sum(-1), torch.ones(2, 3, 4, 10), atol=1e-5)
    assert float(attn.triu(1).abs().max()) == 0.0
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert torch.equal(before, after) and model.config._attn_implementation == "sdpa"


def test_detect_table_matches_manual_scores_and_chunking():
    model = build("llama_gqa")
    r = torch.randint(3, 96, (5, 6), generator=torch.Generator().manual_seed(1))
    ids = torch.cat([torch.ones(5, 1, dtype=torch.long), r, r], dim=1)  # [BOS] r r
    batch = hl.Batch(input_ids=ids)
    table = detect_heads(model, batch, batch_size=2)
    assert set(table.metric) == {
        "previous_token", "duplicate_token", "induction", "induction_diag", "previous_token_diag"
    }  # fmt: skip
    assert len(table) == 5 * 2 * 4
    [(_, attn)] = list(attention_patterns(model, batch, batch_size=5))
    pat = detection_pattern("induction", ids)[None, :, None]
    want = pattern_score(attn, pat).mean(1)  # [layer, head]
    got = table[table.metric == "induction"].sort_values(["layer", "head"])["value"].to_numpy()
    assert got == pytest.approx(want.flatten().numpy(), rel=1e-5)
    diag = diagonal_score(attn, 5).mean(1).flatten().numpy()
    got = table[table.metric == "induction_diag"].sort_values(["layer", "head"])["value"]
    assert got.to_numpy() == pytest.approx(diag, rel=1e-5)
    assert len(top_heads(table, "induction", 3)) == 3
    with pytest.raises(hl.ConfigError, match="no rows for metric 'copying'"):
        top_heads(table, "copying")
    part = DetectPart(("induction",), "abs")
    assert pickle.loads(pickle.dumps(part)) == part and part.key == "detect"
    ctx = Context(model, hl.describe(model), batch, batch_size=2)
    pd.testing.assert_frame_equal(
        part.run(ctx), detect_heads(model, batch, detectors=["induction"], measure="abs")
    )
    assert isinstance(detect_figure(table), Figure)


def test_detect_under_a_plan_changes_only_later_layers():
    model = build("gpt2")
    ids = torch.randint(3, 96, (2, 8), generator=torch.Generator().manual_seed(2))
    batch = hl.Batch(input_ids=ids)
    clean = detect_heads(model, batch, diagonal=False)
    plan = hl.Plan.of({(0, 1): hl.Zero()})
    ablated = detect_heads(model, batch, diagonal=False, plan=plan)
    same = clean[clean.layer == 0]["value"].to_numpy()
    assert ablated[ablated.layer == 0]["value"].to_numpy() == pytest.approx(same)
    diff = (ablated[ablated.layer == 1]["value"] - clean[clean.layer == 1]["value"]).abs()
    assert diff.max() > 1e-6


def test_bad_input_is_refused():
    model = build("llama_gqa")
    ids = torch.randint(3, 96, (2, 8))
    with pytest.raises(hl.ConfigError, match="choose from"):
        detect_heads(model, hl.Batch(input_ids=ids), detectors=["copying"])
    with pytest.raises(hl.ConfigError, match="'mul' or 'abs'"):
        detect_heads(model, hl.Batch(input_ids=ids), measure="sq")
    padded = hl.Batch(input_ids=ids, attention_mask=torch.tensor([[1] * 8, [1] * 6 + [0] * 2]))
    with pytest.raises(hl.ConfigError, match="unpadded"):
        detect_heads(model, padded)
