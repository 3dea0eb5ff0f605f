"""Estimators beyond plain attribution patching, against numerical references: layer-wise
integrated gradients (``ig:*``) converge to exact ablation computed through ``hl.intervene``
(completeness for a whole layer; one moving head alone), equal attribution patching for one step
at a = 0, and count their own cost as the cost model says; recall, depth and cost of ``compare``
on hand-made tables."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest
import tiny_models as T
import torch

import headlab as hl
from headlab.analyses.compare import PER_EXAMPLE_COLUMNS, agreement, compare, recall_depth
from headlab.analyses.estimate import check_methods, estimate, estimate_terms
from headlab.analyses.estimate.cost import exact_sweep_cost, forward_from, gradient_cost, ig_cost
from headlab.analyses.estimate.ig import ig_terms, nodes, parse_ig
from headlab.errors import ConfigError
from headlab.interventions import Mean, Zero
from headlab.plots.compare import compare_figure, recall_cost_figure


@dataclass(frozen=True, eq=False)
class ZeroOneHead(hl.Intervention):
    """Zero only head ``head`` of the selection; the other heads keep their activations, so in
    a layer-wise path only that head moves."""

    head: int

    def apply(self, x, sel, stats):
        keep = (sel.heads.to(x.device) != self.head).to(x.dtype)  # [head]
        return x * keep[None, None, :, None]


def metric_mean(model, batch, plan=None):
    """The token-weighted CE under ``plan``, through ``hl.intervene`` (not the engine)."""
    with torch.no_grad(), hl.intervene(model, plan or hl.Plan()):
        logits = model(**batch.model_inputs()).logits
    return float(hl.get_metric("ce")(logits, batch).mean)


@pytest.fixture(scope="module", params=["llama_gqa", "gpt2"])
def setup(request):
    model = T.build(request.param).double()
    batch = hl.Batch(**T.inputs(request.param, batch=4))
    return model, batch


def layer_sums(terms, method):
    """``[layer]``: the heads' attributions summed, as a change of the token-weighted mean."""
    return (terms.per_example[method].sum(0) / terms.weight.sum()).sum(1)


def test_nodes_integrate_polynomials():
    for rule, steps, degree in [("gauss", 3, 5), ("midpoint", 1, 1), ("left", 1, 0)]:
        a, w = nodes(steps, rule)
        assert w.sum() == pytest.approx(1.0)
        assert (w * a**degree).sum() == pytest.approx(1 / (degree + 1))
    assert nodes(1, "gauss")[0] == pytest.approx([0.5])  # one Gauss point is the midpoint
    assert nodes(1, "left")[0] == pytest.approx([0.0])
    with pytest.raises(ConfigError, match="quadrature rule"):
        nodes(2, "simpson")


def test_one_left_step_is_attribution_patching(setup):
    """With one step at a = 0 the gradient is taken on the clean run: plain attribution
    patching, example by example (zero and mean replacements)."""
    model, batch = setup
    stats = hl.collect_stats(model, batch, config=hl.StatsConfig(bins=20, warmup_tokens=16))
    atp = estimate_terms(model, batch, methods=["atp:zero", "atp:mean"], stats=stats, batch_size=3)
    ig = ig_terms(model, batch, {"ig:zero:1": Zero(), "ig:mean:1": Mean()}, stats=stats,
                  rule="left", batch_size=3)  # fmt: skip
    for name in ("zero", "mean"):
        want = atp.per_example[f"atp:{name}"]
        torch.testing.assert_close(ig.per_example[f"ig:{name}:1"], want, rtol=1e-9, atol=1e-12)
        assert want.abs().max() > 1e-3
    torch.testing.assert_close(ig.weight, atp.weight)
    assert ig.baseline == pytest.approx(atp.baseline, rel=1e-12)


def test_completeness_layer_by_layer(setup):
    """The heads of one layer sum to the exact effect of zeroing that whole layer, within the
    quadrature error: about 1e-3 of a nat off with one point, under 1e-6 with 12."""
    model, batch = setup
    clean = metric_mean(model, batch)
    exact = [
        metric_mean(model, batch, hl.Plan.of({(ly, h): hl.Zero() for h in range(4)})) - clean
        for ly in range(2)
    ]
    assert min(abs(e) for e in exact) > 1e-4
    errors = {}
    for steps in (1, 12):
        terms = ig_terms(model, batch, {f"ig:zero:{steps}": Zero()}, batch_size=8)
        errors[steps] = np.abs(layer_sums(terms, f"ig:zero:{steps}").numpy() - exact)
    assert errors[12].max() < 1e-6
    assert errors[1].max() > 100 * errors[12].max()


def test_patch_completeness_through_estimate_terms(setup):
    """``ig:patch`` (through :func:`estimate_terms`, with a counterfactual batch) sums over a
    layer's heads to the exact effect of patching the whole layer from the counterfactual."""
    model, batch = setup
    name = "llama_gqa" if model.config.model_type == "llama" else "gpt2"
    other = hl.Batch(**T.inputs(name, batch=4, seed=9))
    patch = hl.Patch(hl.record(model, other.model_inputs()))
    clean = metric_mean(model, batch)
    terms = estimate_terms(model, batch, methods=["ig:patch:12"], counterfactual=other)
    got = layer_sums(terms, "ig:patch:12").numpy()
    for ly in range(2):
        want = metric_mean(model, batch, hl.Plan.of({(ly, h): patch for h in range(4)})) - clean
        assert got[ly] == pytest.approx(want, abs=1e-6)
        assert abs(want) > 1e-3


def test_one_moving_head_converges_to_its_exact_ablation(setup):
    """When only head h of each layer moves, its integrated gradient converges to the exact
    effect of zeroing it alone (the other heads get exactly 0)."""
    model, batch = setup
    clean = metric_mean(model, batch)
    for head in (1, 3):
        terms = ig_terms(model, batch, {"ig:one:12": ZeroOneHead(head)}, batch_size=8)
        got = terms.per_example["ig:one:12"].sum(0) / terms.weight.sum()  # [layer, head]
        for ly in range(2):
            want = metric_mean(model, batch, hl.Plan.of({(ly, head): hl.Zero()})) - clean
            assert float(got[ly, head]) == pytest.approx(want, abs=1e-7, rel=1e-5)
            assert abs(want) > 1e-5
        others = [h for h in range(4) if h != head]
        assert got[:, others].abs().max() == 0.0


def test_steps_stacked_in_one_forward_equal_one_at_a_time(setup):
    model, batch = setup
    a = ig_terms(model, batch, {"ig:zero:3": Zero()}, batch_size=1)  # one point per forward
    b = ig_terms(model, batch, {"ig:zero:3": Zero()}, batch_size=16)  # three points per forward
    torch.testing.assert_close(a.per_example["ig:zero:3"], b.per_example["ig:zero:3"])


def test_cost_is_counted_as_the_passes_run(setup):
    """Counted per example while running, equal to the cost model: one clean forward plus per
    layer and step a forward and a backward from that layer on (2 layers: 1 + 3 S (1 + 1/2))."""
    model, batch = setup
    for steps in (1, 3):
        terms = ig_terms(model, batch, {f"ig:zero:{steps}": Zero()}, batch_size=3)
        assert terms.cost[f"ig:zero:{steps}"] == pytest.approx(ig_cost(2, steps))
        assert ig_cost(2, steps) == pytest.approx(1 + 3 * steps * 1.5)
    only = ig_terms(model, batch, {"ig:zero:2": Zero()}, batch_size=3, layers=[1])
    assert only.cost["ig:zero:2"] == pytest.approx(1 + 2 * 3 * 0.5)
    assert only.per_example["ig:zero:2"][:, 0].abs().max() == 0.0
    # the exact sweep: the clean forward + 4 heads x (1 + 1/2); attribution patching 1 + 2
    assert exact_sweep_cost(2, 4) == pytest.approx(7.0)
    assert gradient_cost() == 3.0 and gradient_cost(counterfactual=True) == 4.0
    assert forward_from(29, 30) == pytest.approx(1 / 30)


def test_estimate_table_and_method_names(setup):
    """``estimate`` accepts ig names next to atp ones and reports them like atp (estimated
    metric, clean baseline, estimated change); bad names get a ConfigError naming the fix."""
    model, batch = setup
    table = estimate(model, batch, methods=["ig:zero:2", "atp:zero"], batch_size=3)
    terms = ig_terms(model, batch, {"ig:zero:2": Zero()}, batch_size=3)
    rows = table[table["method"] == "ig:zero:2"].sort_values(["layer", "head"])
    want = terms.per_example["ig:zero:2"].sum(0) / terms.weight.sum()  # [layer, head]
    np.testing.assert_allclose(rows["delta"], want.flatten().numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(rows["value"], rows["baseline"] + rows["delta"])
    assert parse_ig("ig:zero") == ("zero", 1)
    assert parse_ig("ig:scale:2:3") == ("scale:2", 3)
    assert parse_ig("ig:peak:kde:0.5:4") == ("peak:kde:0.5", 4)
    assert check_methods(["ig:mean:2", "ig:zero"]) == ["ig:mean:2", "ig:zero"]
    for bad, why in [("ig:zero:0", "at least 1"), ("ig:bogus:2", "bogus"), ("ig:", "ig:")]:
        with pytest.raises(ConfigError, match=why):
            check_methods([bad])


def per_example(measure, values):
    """A per-example table of ``values [example, layer, head]`` (weight 1 each)."""
    values = np.asarray(values, dtype=float)
    n, n_layers, n_heads = values.shape
    return pd.DataFrame(
        {
            "measure": measure,
            "metric": "ce",
            "example": np.repeat(np.arange(n), n_layers * n_heads),
            "layer": np.tile(np.repeat(np.arange(n_layers), n_heads), n),
            "head": np.tile(np.arange(n_heads), n * n_layers),
            "value": values.reshape(-1),
            "weight": 1.0,
        },
        columns=PER_EXAMPLE_COLUMNS,
    )


def test_recall_depth_and_cost_on_a_hand_made_table():
    """2 layers x 3 heads; heads in (layer, head) order 0..5.
    exact |score|:  [6, 5, 1, 4, 2, 3]  -> top-2 {0, 1}, top-3 {0, 1, 3}
    atp:zero:       [5, 1, 6, 4, 2, 3]  -> ranks [2, 6, 1, 3, 5, 4]
    ig:zero:2:      [6, 4, 1, 5, 2, 3]  -> ranks [1, 3, 6, 2, 5, 4]
    recall@2: atp {2, 0} -> 1/2, ig {0, 3} -> 1/2; depth@2: atp max(2, 6) = 6, ig max(1, 3) = 3.
    recall@3: atp {2, 0, 3} -> 2/3; ig {0, 3, 1} -> 1; depth@3: atp 6, ig 3.
    Costs: exact 1 + 3 (1 + 1/2) = 5.5; atp 1 + 2 = 3; ig:zero:2 1 + 2 x 3 x 1.5 = 10; a head
    of layer 0 checked exactly costs 1, one of layer 1 costs 1/2."""
    exact = np.array([6, 5, 1, 4, 2, 3.0]).reshape(1, 2, 3)
    atp = np.array([5, 1, 6, 4, 2, 3.0]).reshape(1, 2, 3)
    ig = np.array([6, 4, 1, 5, 2, 3.0]).reshape(1, 2, 3)
    per = pd.concat([
        per_example("ablation:zero", np.concatenate([exact, exact])),
        per_example("atp:zero", np.concatenate([atp, atp])),
        per_example("ig:zero:2", np.concatenate([ig, ig])),
    ])  # fmt: skip
    for k, want in [(2, {"atp:zero": (0.5, 6), "ig:zero:2": (0.5, 3)}),
                    (3, {"atp:zero": (2 / 3, 6), "ig:zero:2": (1.0, 3)})]:  # fmt: skip
        rows = agreement(per, reference="ablation:zero", n_boot=0, k=k).set_index("measure")
        for name, (recall, depth) in want.items():
            assert rows.loc[name, "recall"] == pytest.approx(recall)
            assert rows.loc[name, "depth"] == depth
            assert rows.loc[name, "recall"] == pytest.approx(rows.loc[name, "topk_overlap"])
    assert rows.loc["atp:zero", "cost"] == 3.0
    assert rows.loc["atp:zero", "cost_fraction"] == pytest.approx(3 / 5.5)
    assert rows.loc["ig:zero:2", "cost"] == pytest.approx(10.0)
    assert rows.loc["ig:zero:2", "cost_fraction"] == pytest.approx(10 / 5.5)
    # checking heads exactly down to the depth: atp all six (3 in layer 0, 3 in layer 1),
    # ig its top 3 (heads 0 and 1 in layer 0, head 3 in layer 1), after a clean forward
    assert rows.loc["atp:zero", "search_fraction"] == pytest.approx((3 + 1 + 3 + 1.5) / 5.5)
    assert rows.loc["ig:zero:2", "search_fraction"] == pytest.approx((10 + 1 + 2.5) / 5.5)
    own = agreement(pd.concat([per, per_example("mine", np.concatenate([ig, ig]))]),
                    reference="ablation:zero", n_boot=0, k=2).set_index("measure")  # fmt: skip
    assert math.isnan(own.loc["mine", "cost"])  # a measure of the user's own has no cost model
    assert recall_depth([1.0, 1.0, 0.0], [0.0, 1.0, 1.0], 1) == (0.0, 2)  # ties: earlier first


def test_compare_reports_ig_with_its_cost():
    """``compare`` takes ig measures: per example they are ig_terms' per-example means, and the
    agreement table carries recall and the cost model's cost; the figures show them."""
    model = T.build("llama_gqa").double()
    batch = hl.Batch(**T.inputs("llama_gqa", batch=4))
    result = compare(model, batch, methods=["zero"], cheap=["atp", "ig:zero:3"], k=3, n_boot=20)
    terms = ig_terms(model, batch, {"ig:zero:3": Zero()}, batch_size=8)
    got = result.per_example[result.per_example["measure"] == "ig:zero:3"]
    want = terms.per_example["ig:zero:3"] / terms.weight[:, None, None]  # [example, layer, head]
    np.testing.assert_allclose(got["value"], want.flatten().numpy(), rtol=1e-9, atol=1e-12)
    rows = result.agreement.set_index("measure")
    assert rows.loc["ig:zero:3", "cost"] == pytest.approx(ig_cost(2, 3))
    assert rows.loc["ig:zero:3", "cost_fraction"] == pytest.approx(ig_cost(2, 3) / 7.0)
    assert rows.loc["atp:zero", "cost_fraction"] == pytest.approx(3 / 7.0)
    assert 0 <= rows.loc["ig:zero:3", "recall"] <= 1 and 3 <= rows.loc["ig:zero:3", "depth"] <= 8
    fig = recall_cost_figure(result.agreement)
    (ax,) = fig.axes
    assert ax.get_xscale() == "log"
    points = ax.collections[0].get_offsets()  # [measure, (cost fraction, recall)]
    np.testing.assert_allclose(points, result.agreement[["cost_fraction", "recall"]].to_numpy())
    assert "cost 43%" in compare_figure(result.scores, result.agreement).axes[0].get_title()
    with pytest.raises(ConfigError, match="ig:METHOD"):
        compare(model, batch, methods=["zero"], cheap=["integrated"])


def test_estimate_command_takes_ig(tmp_path, capsys):
    """``headlab estimate --method ig:mean:2`` end to end on a tiny local model: statistics are
    collected for the mean, the table equals the Python API on the saved tokens and statistics,
    and a step count of 0 is an error that names the fix."""
    from tiny_folder import make_model_folder

    from headlab.cli.app import main
    from headlab.models.load import load_model
    from headlab.runs import RunDir

    folder = str(make_model_folder(tmp_path / "model"))
    args = ["estimate", "--model", folder, "--data", "python-docs", "--seq-len", "16",
            "--n-blocks", "3", "--n-stats-blocks", "4", "--batch-size", "2", "--bins", "50",
            "--quiet", "--metric", "ce"]  # fmt: skip
    out = tmp_path / "run"
    assert main([*args, "--method", "ig:mean:2,atp:mean", "--out", str(out)]) == 0
    assert "ig:mean:2, ce: top 5 heads" in capsys.readouterr().out
    assert (out / "heatmap_ig_mean_2_ce.png").is_file()
    got = pd.read_parquet(out / "estimates.parquet")
    got = got[got["method"] == "ig:mean:2"].reset_index(drop=True)
    model, _ = load_model(folder)
    stats = hl.Stats.load(out / "stats.safetensors", model=model)
    batch = RunDir(out, {}).load_tokens()
    want = estimate(model, batch, methods=["ig:mean:2"], stats=stats, batch_size=2)
    np.testing.assert_allclose(got["delta"], want["delta"], rtol=1e-5, atol=1e-8)
    assert got["delta"].abs().max() > 1e-4
    assert main([*args, "--method", "ig:zero:0", "--out", str(tmp_path / "bad")]) == 2
    assert "at least 1, e.g. ig:zero:2" in capsys.readouterr().err
