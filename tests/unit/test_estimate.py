"""Cheap estimates against independent computations: finite differences of an interpolation
toward the replacement, exact ablation where the metric is linear in the head, a manual Michel
gradient through Gate multipliers, and rollout by explicit matrix products."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pandas as pd
import pytest
import tiny_models as T
import torch
from torch import nn

import headlab as hl
from headlab.analyses.estimate import estimate, estimate_then_exact, rollout_scores
from headlab.analyses.ranking import spearman
from headlab.analyses.sweep import COLUMNS


@dataclass(frozen=True, eq=False)
class Toward(hl.Intervention):
    """Move the activations a fraction ``eps`` of the way to what ``target`` would put there."""

    target: hl.Intervention
    eps: float

    def apply(self, x, sel, stats):
        return x + self.eps * (self.target.apply(x, sel, stats) - x)


def metric_mean(model, batch, plan, metric, stats=None):
    with torch.no_grad(), hl.intervene(model, plan, stats=stats):
        logits = model(**batch.model_inputs()).logits
    return hl.get_metric(metric)(logits, batch).mean


@pytest.fixture(scope="module")
def setup():
    model = T.build("llama_gqa").double()
    batch = hl.Batch(**T.inputs("llama_gqa", batch=4))
    stats = hl.collect_stats(
        model,
        hl.Batch(**T.inputs("llama_gqa", batch=6, seed=7)),
        config=hl.StatsConfig(bins=50, reservoir=4, warmup_tokens=64),
    )
    other = hl.Batch(**T.inputs("llama_gqa", batch=4, seed=9))
    return model, batch, stats, other


@pytest.mark.parametrize("method", ["zero", "mean", "peak", "resample:1", "scale:-1", "patch"])
def test_atp_equals_the_first_order_taylor_term(setup, method):
    """The estimate is d/de M(z + e (r - z)) at e = 0: by autograd through an interpolating
    intervention (independent of the estimator's taps), and roughly by central differences
    (the metrics compute in float32, which limits finite differences to ~1e-3)."""
    model, batch, stats, other = setup
    table = estimate(
        model,
        batch,
        methods=[f"atp:{method}"],
        stats=stats,
        counterfactual=other,
        batch_size=3,  # two sub-batches: resample donors and patch rows must follow the offset
    )
    assert list(table.columns) == COLUMNS and len(table) == 8
    target = (
        hl.Patch(hl.record(model, other.model_inputs()))
        if method == "patch"
        else hl.interventions.intervention_from_name(method)
    )
    for layer, head in [(0, 2), (1, 1)]:
        eps = torch.zeros((), dtype=torch.float64, requires_grad=True)
        with hl.intervene(model, hl.Plan.of({(layer, head): Toward(target, eps)}), stats=stats):
            logits = model(**batch.model_inputs()).logits
        s = hl.get_metric("ce")(logits, batch)
        loss = torch.nan_to_num(s.per_token).sum() / (~torch.isnan(s.per_token)).sum()
        (taylor,) = torch.autograd.grad(loss, eps)
        h = 1e-2
        plus, minus = (
            metric_mean(model, batch, hl.Plan.of({(layer, head): Toward(target, e)}), "ce", stats)
            for e in (h, -h)
        )
        row = table[(table.layer == layer) & (table["head"] == head)].iloc[0]
        assert row["delta"] == pytest.approx(float(taylor), rel=1e-5)
        assert row["delta"] == pytest.approx((plus - minus) / (2 * h), rel=2e-2)
        assert row["value"] == pytest.approx(row["baseline"] + row["delta"])
        assert abs(row["delta"]) > 1e-4


def test_atp_zero_is_minus_the_gate_derivative(setup):
    """With a Gate multiplier xi on the head, zero ablation's estimate is -dM/dxi at xi = 1."""
    model, batch, _, _ = setup
    table = estimate(model, batch, methods=["atp:zero"])
    for layer in range(2):
        gate = torch.ones(4, dtype=torch.float64, requires_grad=True)
        plan = hl.Plan.of({hl.Site(layer, heads=(0, 1, 2, 3)): hl.Gate(gate)})
        with hl.intervene(model, plan):
            logits = model(**batch.model_inputs()).logits
        s = hl.get_metric("ce")(logits, batch)
        loss = torch.nan_to_num(s.per_token).sum() / (~torch.isnan(s.per_token)).sum()
        (grad,) = torch.autograd.grad(loss, gate)
        got = table[table.layer == layer].sort_values("head")["delta"].to_numpy()
        torch.testing.assert_close(torch.tensor(got), -grad.detach(), rtol=1e-5, atol=1e-9)


@pytest.fixture(scope="module")
def linear():
    """GPT-J runs attention and MLP in parallel from the same input, so with the final norm
    removed the logits are affine in the last layer's head outputs: estimates there are exact."""
    model = T.build("gptj").double()
    model.transformer.ln_f = nn.Identity()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, T.VOCAB, (5, T.SEQ), generator=g)
    batch = hl.Batch(
        input_ids=ids,
        answer_pos=torch.randint(3, T.SEQ, (5,), generator=g),
        correct=torch.randint(3, T.VOCAB, (5,), generator=g),
        wrong=torch.randint(3, T.VOCAB, (5,), generator=g),
    )
    stats = hl.collect_stats(
        model, hl.Batch(**T.inputs("gptj", batch=6, seed=7)), config=hl.StatsConfig(bins=50)
    )
    return model, batch, stats


@pytest.mark.parametrize("method", ["zero", "mean", "scale:3"])
def test_estimate_is_exact_where_the_metric_is_linear(linear, method):
    model, batch, stats = linear
    est = estimate(model, batch, methods=[f"atp:{method}"], metrics=["logit_diff"], stats=stats)
    exact = hl.sweep(
        model,
        batch,
        methods=[method],
        metrics=["logit_diff"],
        stats=stats,
        heads=[(1, h) for h in range(4)],
    )
    got = est[est.layer == 1].sort_values("head")
    want = exact.sort_values("head")
    # exact up to float32 rounding inside the metric
    assert got["delta"].to_numpy() == pytest.approx(want["delta"].to_numpy(), rel=1e-5, abs=1e-8)
    assert got["effect"].to_numpy() == pytest.approx(want["effect"].to_numpy(), rel=1e-5, abs=1e-8)
    assert got["delta_sd"].to_numpy() == pytest.approx(want["delta_sd"].to_numpy(), rel=1e-4)
    assert (want["delta"].abs() > 1e-4).all()


def test_adaptive_mode_correlates_perfectly_where_linear(linear):
    model, batch, _ = linear
    check = estimate_then_exact(
        model, batch, method="atp:zero", metric="logit_diff", exact_top=2, n_random=0
    )
    # only layer-1 heads are exact; the top two by |estimate| are checked
    assert len(check.estimates) == 8 and len(check.exact) == 2
    row = check.correlation.iloc[0]
    assert row["n_checked"] == 2 and row["exact_method"] == "zero"
    assert set(check.table["method"]) == {"atp:zero", "zero"}


def test_adaptive_mode_samples_random_heads_and_reports_spearman(setup):
    model, batch, _, _ = setup
    check = estimate_then_exact(model, batch, method="gradient", exact_top=2, n_random=4, seed=3)
    assert len(check.exact) == 6
    row = check.correlation.iloc[0]
    assert row["n_random"] == 4 and row["n_checked"] == 6
    joined = check.estimates.merge(check.exact, on=["layer", "head"], suffixes=("_e", ""))
    assert row["spearman"] == pytest.approx(
        spearman(joined["effect_e"].abs(), joined["effect"].abs())
    )
    assert math.isnan(row["spearman_signed"])
    again = estimate_then_exact(model, batch, method="gradient", exact_top=2, n_random=4, seed=3)
    assert again.exact[["layer", "head"]].equals(check.exact[["layer", "head"]])


def test_spearman_matches_the_textbook_formula():
    a = [0.3, 1.2, -0.5, 4.0, 2.2, 0.9]
    b = [1.0, 2.0, 0.0, 3.5, 3.0, 0.5]
    ra = torch.tensor(a).argsort().argsort().double()
    rb = torch.tensor(b).argsort().argsort().double()
    n = len(a)
    want = 1 - 6 * float(((ra - rb) ** 2).sum()) / (n * (n * n - 1))
    assert spearman(a, b) == pytest.approx(want)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486832980505138)
    assert math.isnan(spearman([1, 2], [2, 1])) and math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_gradient_importance_matches_a_manual_computation(setup):
    """I_h = mean over examples of |dL_x/dxi_h|, each example alone, then / layer l2 norm."""
    model, batch, _, _ = setup
    table = estimate(model, batch, methods=["gradient"], batch_size=3)
    per = torch.zeros(len(batch), 2, 4, dtype=torch.float64)
    for b in range(len(batch)):
        one = batch.slice(b, b + 1)
        gates = [torch.ones(4, dtype=torch.float64, requires_grad=True) for _ in range(2)]
        plan = hl.Plan.of(
            {hl.Site(ly, heads=(0, 1, 2, 3)): hl.Gate(g) for ly, g in enumerate(gates)}
        )
        with hl.intervene(model, plan):
            logits = model(**one.model_inputs()).logits
        loss = hl.get_metric("ce")(logits, one).per_example.sum()
        for ly, g in enumerate(torch.autograd.grad(loss, gates)):
            per[b, ly] = g
    raw = per.abs().mean(0)
    norm = raw / (raw.norm(dim=1, keepdim=True) + 1e-20)
    got = table.sort_values(["layer", "head"])
    assert got["delta"].to_numpy() == pytest.approx(raw.flatten().numpy(), rel=1e-5)
    assert got["value"].to_numpy() == pytest.approx(norm.flatten().numpy(), rel=1e-5)
    assert (got["effect"] == got["value"]).all() and got["baseline"].isna().all()


def causal_patterns(n_layers, batch, heads, seq, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_layers):
        a = torch.rand(batch, heads, seq, seq, generator=g, dtype=torch.float64)
        a = a.masked_fill(torch.ones(seq, seq).triu(1).bool(), 0.0)
        out.append(a / a.sum(-1, keepdim=True))
    return out


def test_rollout_of_a_hand_built_stack_equals_explicit_products():
    n_layers, n, n_heads, seq = 4, 2, 3, 6
    att = causal_patterns(n_layers, n, n_heads, seq)
    target = torch.tensor([5, 3])
    sources = torch.zeros(n, seq, dtype=torch.bool)
    sources[0, 1:3] = True
    sources[1, [0, 2]] = True
    got = rollout_scores(att, target, sources)
    eye = torch.eye(seq, dtype=torch.float64)
    for b in range(n):
        mixed = [0.5 * a[b].mean(0) + 0.5 * eye for a in att]
        for ly in range(n_layers):
            above = eye
            for k in range(n_layers - 1, ly, -1):
                above = above @ mixed[k]  # R_{L:l+1} = A~_L ... A~_{l+1}
            below = eye
            for k in range(ly - 1, -1, -1):
                below = below @ mixed[k]  # R_{l-1:1} = A~_{l-1} ... A~_1
            for h in range(n_heads):
                routed = above @ ((0.5 / n_heads) * att[ly][b, h]) @ below
                want = routed[target[b], sources[b]].sum()
                assert float(got[b, ly, h]) == pytest.approx(float(want), rel=1e-12)
        # heads plus the residual path carry exactly the total rollout mass, at every layer
        total = eye
        for k in range(n_layers - 1, -1, -1):
            total = total @ mixed[k]
        mass = total[target[b], sources[b]].sum()
        for ly in range(n_layers):
            above = eye
            for k in range(n_layers - 1, ly, -1):
                above = above @ mixed[k]
            below = eye
            for k in range(ly - 1, -1, -1):
                below = below @ mixed[k]
            resid = (above @ (0.5 * eye) @ below)[target[b], sources[b]].sum()
            assert float(got[b, ly].sum() + resid) == pytest.approx(float(mass), rel=1e-12)


def test_rollout_of_self_attention_routes_nothing_to_other_positions():
    att = [torch.eye(5, dtype=torch.float64).expand(1, 2, 5, 5) for _ in range(3)]
    sources = torch.tensor([[False, True, True, True, False]])
    assert rollout_scores(att, torch.tensor([4]), sources).abs().max() == 0


def test_rollout_on_a_model_switches_to_eager_and_back():
    model = T.build("llama_gqa")
    assert model.config._attn_implementation == "sdpa"
    batch = hl.Batch(**T.inputs("llama_gqa", batch=3))
    table = estimate(model, batch, methods=["rollout"], batch_size=2)
    assert model.config._attn_implementation == "sdpa"
    model.set_attn_implementation("eager")
    with torch.no_grad():
        att = model(**batch.model_inputs(), output_attentions=True).attentions
    model.set_attn_implementation("sdpa")
    target = torch.full((3,), T.SEQ - 1)
    sources = (torch.arange(T.SEQ) >= 1) & (torch.arange(T.SEQ) < T.SEQ - 1)
    want = rollout_scores(att, target, sources.expand(3, -1)).mean(0)
    got = table.sort_values(["layer", "head"])
    assert got["value"].to_numpy() == pytest.approx(want.flatten().numpy(), rel=1e-5)
    assert set(got["metric"]) == {"attention"} and got["delta"].isna().all()


@pytest.mark.parametrize("name", ["gpt2", "bert", "opt", "gemma2"])
def test_every_estimate_runs_on_other_families(name):
    model = T.build(name)
    batch = hl.Batch(**T.inputs(name, batch=3))
    metric = "ce"
    if name in T.ENCODERS:
        batch = hl.mlm_batch(batch.input_ids, mask_token_id=4, vocab_size=T.VOCAB, rate=0.3)
        metric = "mlm_ce"
    impl = model.config._attn_implementation
    table = estimate(model, batch, methods=["atp:zero", "gradient", "rollout"], metrics=[metric])
    assert len(table) == 3 * 8 and table[["value", "effect"]].notna().all().all()
    assert model.config._attn_implementation == impl
    assert all(p.grad is None for p in model.parameters())
    for proj in hl.describe(model).out_projs:
        assert not proj._forward_pre_hooks


def test_bad_requests_fail_clearly(setup):
    model, batch, _, _ = setup
    with pytest.raises(hl.ConfigError, match="atp:mean has no replacement value without"):
        estimate(model, batch, methods=["atp:mean"])
    with pytest.raises(hl.ConfigError, match="atp:resample has no replacement value"):
        estimate(model, batch, methods=["atp:resample"])
    with pytest.raises(hl.ConfigError, match="pass counterfactual=Batch"):
        estimate(model, batch, methods=["atp:patch"])
    with pytest.raises(hl.ConfigError, match="'top1' has no gradient"):
        estimate(model, batch, methods=["atp:zero"], metrics=["top1"])
    with pytest.raises(hl.ConfigError, match="zero gradient"):
        estimate(model, batch, methods=["gradient"], metrics=["kl"])
    with pytest.raises(hl.ConfigError, match="unknown estimate 'shapley'"):
        estimate(model, batch, methods=["shapley"])
    with pytest.raises(hl.ConfigError, match="must match the batch"):
        estimate(model, batch, methods=["atp:patch"], counterfactual=batch.slice(0, 2))
    with pytest.raises(hl.ConfigError, match="rollout sources"):
        estimate(model, batch, methods=["rollout"], rollout_sources="everything")


def test_cli_writes_estimates_and_the_exact_check(tmp_path, capsys):
    from tiny_folder import make_model_folder

    from headlab.cli.app import main

    folder = make_model_folder(tmp_path / "model")
    out = tmp_path / "run"
    argv = ["estimate", "--model", str(folder), "--seq-len", "16", "--n-blocks", "3"]
    argv += ["--n-stats-blocks", "4", "--method", "atp:zero,atp:mean,gradient,rollout"]
    argv += ["--exact-top", "2", "--n-random", "2", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "atp:zero, ce: top 5 heads" in printed and "Spearman" in printed
    table = pd.read_parquet(out / "estimates.parquet")
    assert list(table.columns) == COLUMNS and len(table) == 4 * 12
    correlation = pd.read_csv(out / "correlation.csv")
    assert list(correlation["method"]) == ["atp:zero", "atp:mean", "gradient", "rollout"]
    assert (correlation["n_checked"] == 4).all()
    exact = pd.read_parquet(out / "exact.parquet")
    assert set(exact["method"]) == {"zero", "mean"}
    # the exact rows equal a direct sweep of those heads
    from headlab.models.load import load_model
    from headlab.runs import RunDir

    model, _ = load_model(str(folder))
    batch = RunDir(out, {}).load_tokens()
    zero = exact[exact.method == "zero"]
    heads = list(zip(zero.layer, zero["head"], strict=True))
    direct = hl.sweep(model, batch, methods=["zero"], heads=heads)
    assert direct["value"].to_numpy() == pytest.approx(zero["value"].to_numpy(), rel=1e-6)
    assert sorted(p.name for p in out.glob("heatmap_*.png")) == [
        "heatmap_atp_mean_ce.png",
        "heatmap_atp_zero_ce.png",
        "heatmap_gradient_ce.png",
        "heatmap_rollout_attention.png",
    ]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["kind"] == "estimate"


def test_run_estimate_writes_what_the_cli_writes(tmp_path):
    from tiny_folder import make_model_folder

    from headlab.cli.app import main

    folder = make_model_folder(tmp_path / "model")
    options = {"seq_len": 16, "n_blocks": 3, "n_stats_blocks": 4, "exact_top": 2, "n_random": 1}
    argv = ["estimate", "--model", str(folder), "--method", "atp:zero,atp:mean,rollout"]
    argv += [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]
    assert main([*argv, "--out", str(tmp_path / "cli"), "--quiet"]) == 0
    out = tmp_path / "twin"
    result = hl.run_estimate(
        out=out, model=str(folder), methods=["atp:zero", "atp:mean", "rollout"], **options
    )
    assert result.run_dir.path == out
    for name in ("estimates.parquet", "exact.parquet"):
        pd.testing.assert_frame_equal(
            pd.read_parquet(out / name), pd.read_parquet(tmp_path / "cli" / name)
        )
    for name in ("correlation.csv", "ranking.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(out / name), pd.read_csv(tmp_path / "cli" / name))
    saved = pd.read_parquet(out / "estimates.parquet")
    pd.testing.assert_frame_equal(result.table, saved, check_dtype=False)
    assert sorted(result.figures) == sorted(p.name for p in out.glob("heatmap_*.png"))
    assert len(result.figures) == 3
    mine, theirs = (json.loads((d / "manifest.json").read_text()) for d in (out, tmp_path / "cli"))
    assert mine["kind"] == theirs["kind"] == "estimate"
    assert mine["identity"] == theirs["identity"]


def test_cli_refuses_a_metric_without_gradient(tmp_path, capsys):
    from tiny_folder import make_model_folder

    from headlab.cli.app import main

    folder = make_model_folder(tmp_path / "model")
    argv = ["estimate", "--model", str(folder), "--seq-len", "16", "--n-blocks", "2"]
    argv += ["--n-stats-blocks", "2", "--metric", "top1", "--out", str(tmp_path / "r"), "--quiet"]
    assert main(argv) == 2
    assert "'top1' has no gradient" in capsys.readouterr().err
