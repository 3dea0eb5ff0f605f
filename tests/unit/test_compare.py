"""`compare` against independent computations: Spearman by hand, a loop bootstrap, top-k overlap on
hand-made tables, per-example measures averaged back to the sweep and the estimates, raw attention
from the model's own patterns, and the ground-truth circuit."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import tiny_models as T
import torch
from fixtures import ground_truth as gt

import headlab as hl
from headlab.analyses.compare import (
    PER_EXAMPLE_COLUMNS,
    agreement,
    compare,
    measure_scores,
    measures,
    summarise,
)
from headlab.analyses.estimate import estimate
from headlab.analyses.ranking import rank_correlation, spearman, topk_overlap
from headlab.plots.compare import compare_figure


def table(measure, values, weights, metric="ce"):
    """A per-example table from ``values [example, layer, head]`` and ``weights [example]``."""
    rows = []
    for i, per in enumerate(np.asarray(values, dtype=float)):
        for ly, heads in enumerate(per):
            for h, v in enumerate(heads):
                rows.append([measure, metric, i, ly, h, v, float(weights[i])])
    return pd.DataFrame(rows, columns=PER_EXAMPLE_COLUMNS)


def test_spearman_with_ties_matches_a_hand_computation():
    # ranks of x: [1, 2.5, 2.5, 4, 5]; of y: [2, 1, 3, 5, 4]
    x, y = [0.1, 0.5, 0.5, 0.9, 1.3], [2.0, 1.0, 3.0, 8.0, 4.0]
    rx, ry = np.array([1, 2.5, 2.5, 4, 5]), np.array([2, 1, 3, 5, 4.0])
    dx, dy = rx - 3, ry - 3
    want = (dx * dy).sum() / math.sqrt((dx**2).sum() * (dy**2).sum())  # = 7 / sqrt(9.5 * 10)
    assert want == pytest.approx(7 / math.sqrt(95))
    got = rank_correlation(np.array([x, y]), np.array([y, x]))
    assert got == pytest.approx([want, want])
    assert float(rank_correlation(x, y)[0]) == pytest.approx(spearman(x, y))
    assert math.isnan(rank_correlation([1.0, 1.0, 1.0], [1.0, 2.0, 3.0])[0])


def test_topk_overlap_on_hand_made_tables():
    a = [5.0, 4.0, 3.0, 2.0, 1.0]
    b = [1.0, 5.0, 4.0, 0.0, 3.0]
    assert topk_overlap(a, b, 1) == 0.0  # {0} vs {1}
    assert topk_overlap(a, b, 2) == 0.5  # {0, 1} vs {1, 2}
    assert topk_overlap(a, b, 3) == pytest.approx(2 / 3)  # {0, 1, 2} vs {1, 2, 4}
    assert topk_overlap(a, b, 5) == 1.0
    assert topk_overlap([1.0, 1.0, 0.0], [0.0, 1.0, 1.0], 1) == 0.0  # ties: earlier first
    with pytest.raises(hl.ConfigError, match="1 <= k <= 5"):
        topk_overlap(a, b, 6)


def test_scores_are_weighted_means_in_absolute_value_and_gradient_is_layer_normalised():
    values = [[[1.0, -2.0], [3.0, 0.0]], [[-3.0, 4.0], [1.0, 2.0]]]  # [example, layer, head]
    w = [1.0, 3.0]
    per = pd.concat([table("ablation:zero", values, w), table("gradient", values, w)])
    scores = measure_scores(per).set_index(["measure", "layer", "head"])["value"]
    mean = (np.array(values[0]) * 1 + np.array(values[1]) * 3) / 4  # [[-2, 2.5], [1.5, 1.5]]
    assert [scores[("ablation:zero", 0, 0)], scores[("ablation:zero", 0, 1)]] == [2.0, 2.5]
    norm = np.abs(mean) / np.sqrt((mean**2).sum(1, keepdims=True))
    assert scores[("gradient", 0, 0)] == pytest.approx(norm[0, 0])
    assert scores[("gradient", 1, 1)] == pytest.approx(1 / math.sqrt(2))


def random_measures(n=6, seed=0):
    g = np.random.default_rng(seed)
    base = g.normal(size=(1, 3, 4))
    ref = base + 0.5 * g.normal(size=(n, 3, 4))
    other = base + 1.0 * g.normal(size=(n, 3, 4))
    w = g.integers(1, 5, size=n)
    return pd.concat([table("ablation:zero", ref, w), table("atp:zero", other, w)]), ref, other, w


def test_bootstrap_equals_a_loop_over_resamples():
    per, ref, other, w = random_measures()
    n, n_boot, seed = len(w), 200, 5
    got = agreement(per, reference="ablation:zero", n_boot=n_boot, k=3, ci=0.9, seed=seed).iloc[0]
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    rhos = []
    for draw in idx:
        a = np.abs(sum(w[i] * other[i] for i in draw) / sum(w[i] for i in draw)).ravel()
        b = np.abs(sum(w[i] * ref[i] for i in draw) / sum(w[i] for i in draw)).ravel()
        rhos.append(spearman(a, b))
    assert got["ci_low"] == pytest.approx(np.percentile(rhos, 5))
    assert got["ci_high"] == pytest.approx(np.percentile(rhos, 95))
    a = np.abs((w[:, None, None] * other).sum(0) / w.sum()).ravel()
    b = np.abs((w[:, None, None] * ref).sum(0) / w.sum()).ravel()
    assert got["spearman"] == pytest.approx(spearman(a, b))
    assert got["ci_low"] <= got["spearman"] <= got["ci_high"]
    assert got["topk_overlap"] == topk_overlap(a, b, 3)
    assert (got["n_examples"], got["n_heads"], got["n_boot"]) == (6, 12, 200)


def test_bootstrap_collapses_to_the_point_estimate_on_identical_examples():
    _, ref, other, _ = random_measures()
    same = pd.concat(
        [table("ablation:zero", np.repeat(ref[:1], 5, 0), [2] * 5),
         table("atp:zero", np.repeat(other[:1], 5, 0), [2] * 5)]
    )  # fmt: skip
    row = agreement(same, reference="ablation:zero", n_boot=300, k=4).iloc[0]
    assert row["ci_low"] == pytest.approx(row["spearman"]) == pytest.approx(row["ci_high"])
    assert abs(row["spearman"]) < 1  # not trivially perfect


def test_a_measure_agrees_perfectly_with_a_copy_of_itself():
    per, *_ = random_measures()
    copy = per[per.measure == "atp:zero"].assign(measure="copy")
    row = agreement(pd.concat([per, copy]), reference="atp:zero", n_boot=100, k=5)
    row = row.set_index("measure").loc["copy"]
    assert (row["spearman"], row["ci_low"], row["ci_high"], row["topk_overlap"]) == (1, 1, 1, 1)


@pytest.fixture(scope="module")
def tiny():
    model = T.build("llama_gqa").double()
    batch = hl.Batch(**T.inputs("llama_gqa", batch=5))
    stats = hl.collect_stats(
        model,
        hl.Batch(**T.inputs("llama_gqa", batch=6, seed=7)),
        config=hl.StatsConfig(bins=50, reservoir=4, warmup_tokens=64),
    )
    result = compare(model, batch, methods=["zero", "mean"], stats=stats, n_boot=100, k=3,
                     batch_size=2)  # fmt: skip
    return model, batch, stats, result


def test_per_example_ablation_averages_to_the_sweep(tiny):
    model, batch, stats, result = tiny
    sweep = hl.sweep(model, batch, methods=["zero", "mean"], stats=stats)
    scores = result.scores.set_index(["measure", "layer", "head"])["value"]
    for r in sweep.itertuples():
        assert scores[(f"ablation:{r.method}", r.layer, r.head)] == pytest.approx(
            abs(r.delta), rel=1e-9
        )
    per = result.per_example[result.per_example.measure == "ablation:zero"]
    one = per[(per.layer == 1) & (per["head"] == 2)].sort_values("example")
    for i in range(len(batch)):  # each example alone is a sweep of that example
        alone = hl.sweep(model, batch.slice(i, i + 1), heads=[(1, 2)])
        assert one["value"].iloc[i] == pytest.approx(alone["delta"].iloc[0], rel=1e-9)
        assert one["weight"].iloc[i] == T.SEQ - 1


def test_cheap_measures_average_to_the_estimates(tiny):
    model, batch, stats, result = tiny
    est = estimate(model, batch, methods=["atp:zero", "atp:mean", "gradient", "rollout"],
                   stats=stats)  # fmt: skip
    scores = result.scores.set_index(["measure", "layer", "head"])["value"]
    for r in est.itertuples():
        assert scores[(r.method, r.layer, r.head)] == pytest.approx(abs(r.effect), rel=1e-6)


def test_every_measure_agrees_with_itself_and_the_table_is_complete(tiny):
    _, _, _, result = tiny
    names = ["ablation:zero", "ablation:mean", "atp:zero", "atp:mean", "gradient", "rollout",
             "attention"]  # fmt: skip
    assert list(result.agreement["measure"]) == names[1:]
    assert list(dict.fromkeys(result.scores["measure"])) == names
    diag = result.pairs[result.pairs.measure == result.pairs.other]
    assert (diag["spearman"] == 1).all() and (diag["topk_overlap"] == 1).all()
    sym = result.pairs.set_index(["measure", "other"])["spearman"]
    assert sym[("atp:zero", "rollout")] == pytest.approx(sym[("rollout", "atp:zero")])
    row = result.agreement.set_index("measure").loc["atp:zero"]
    assert row["ci_low"] <= row["spearman"] <= row["ci_high"]
    fig = compare_figure(result.scores, result.agreement)
    assert len([ax for ax in fig.axes if ax.get_visible()]) == 6
    assert fig.axes[1].get_title().startswith("atp:zero\nρ = ")


def test_raw_attention_is_the_heads_own_attention_to_the_context(tiny):
    model, batch, _, result = tiny
    model.set_attn_implementation("eager")
    with torch.no_grad():
        att = model(**batch.model_inputs(), output_attentions=True).attentions
    model.set_attn_implementation("sdpa")
    t = T.SEQ - 1  # no target mask: the last position reads positions 1 .. t-1
    want = torch.stack([a[:, :, t, 1:t].sum(-1) for a in att], 1)  # [example, layer, head]
    per = result.per_example[result.per_example.measure == "attention"]
    got = per.sort_values(["example", "layer", "head"])["value"].to_numpy()
    assert got == pytest.approx(want.flatten().numpy(), rel=1e-6)
    assert set(per["metric"]) == {"attention:context"} and (per["weight"] == 1).all()
    scores = result.scores[result.scores.measure == "attention"].sort_values(["layer", "head"])
    assert scores["value"].to_numpy() == pytest.approx(want.mean(0).flatten().numpy())
    assert model.config._attn_implementation == "sdpa"


def test_ground_truth_circuit_on_top_of_exact_ablation_and_gradient():
    """Single-head zero ablation finds the previous-token head (its removal costs ~11 nats) and one
    induction head; the other induction head is its backup, so removing it alone barely matters
    (tests/fixtures/ground_truth.py). Gradient importance, taken per example before averaging,
    ranks the whole circuit first; attribution patching only the previous-token head; raw
    attention onto the induction target finds both induction heads."""
    model, _ = gt.load()
    batch, _ = gt.induction(8)
    cheap = ["atp", "gradient", "attention"]
    result = compare(model, batch, methods=["zero"], cheap=cheap, n_boot=200, k=3)
    ranked = {
        name: list(zip(g.layer, g["head"], strict=True))
        for name, g in result.scores.sort_values(["rank", "layer", "head"]).groupby("measure")
    }
    exact = ranked["ablation:zero"]
    assert exact[0] == gt.PREVIOUS[0] and exact[1] in gt.INDUCTION
    scores = result.scores.set_index(["measure", "layer", "head"])["value"]
    assert scores[("ablation:zero", *gt.PREVIOUS[0])] > 10
    backup = next(h for h in gt.INDUCTION if h != exact[1])
    assert scores[("ablation:zero", *backup)] < 0.1 * scores[("ablation:zero", *exact[1])]
    assert set(ranked["gradient"][:3]) == set(gt.CIRCUIT)
    assert ranked["atp:zero"][0] == gt.PREVIOUS[0]
    assert set(ranked["attention"][:2]) == set(gt.INDUCTION)  # attention to the induction target
    assert set(result.scores.query("measure == 'attention'")["metric"]) == {"attention:induction"}
    rows = result.agreement.set_index("measure")
    assert rows.loc["gradient", "topk_overlap"] == pytest.approx(2 / 3)
    assert rows.loc["gradient", "spearman"] > 0.5 and rows.loc["atp:zero", "spearman"] > 0.5


def test_bad_requests_fail_clearly(tiny):
    model, batch, _, result = tiny
    with pytest.raises(hl.ConfigError, match="unknown measure 'shap'"):
        measures(["zero"], ["shap"])
    with pytest.raises(hl.ConfigError, match="at least one exact ablation"):
        measures([], ["atp"])
    with pytest.raises(hl.ConfigError, match="unknown"):
        measures(["zeroo"], [])
    with pytest.raises(hl.ConfigError, match="reference 'rollout' is not one"):
        compare(model, batch, methods=["zero"], cheap=["atp"], reference="rollout")
    with pytest.raises(hl.ConfigError, match="between 1 and the 8 heads"):
        agreement(result.per_example, reference="ablation:zero", k=9)
    with pytest.raises(hl.ConfigError, match="no rows for gradient"):
        summarise(result.per_example[result.per_example.measure != "gradient"],
                  reference="ablation:zero", order=["ablation:zero", "gradient"])  # fmt: skip
    short = result.per_example[~((result.per_example.measure == "rollout")
                                 & (result.per_example.example == 0))]  # fmt: skip
    with pytest.raises(hl.ConfigError, match="covers other heads or examples"):
        agreement(short, reference="ablation:zero")
