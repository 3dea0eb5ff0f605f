"""Learned head gates (CHG, contrastive CHG, L0): oracles on tiny models and a planted circuit."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pandas as pd
import pytest
import tiny_models
import torch
import transformers as tf

import headlab as hl
from headlab.analyses.gates.chg import (
    CHGConfig,
    CHGFitPart,
    chg,
    chg_penalty,
    gate_nll,
    head_taxonomy,
)
from headlab.analyses.gates.contrast import (
    ContrastConfig,
    ContrastPart,
    contrastive_chg,
    contrastive_pass,
)
from headlab.analyses.gates.core import (
    MaskGate,
    accumulate_gradient,
    frozen,
    loss_targets,
    masked_nll,
    nll_pass,
    optimise,
)
from headlab.analyses.gates.l0 import (
    L0Config,
    L0FitPart,
    check_l0_lambdas,
    hard_concrete,
    hard_concrete_test,
    l0_penalty,
    l0_sweep,
)
from headlab.analyses.gates.validate import label_groups, validate_labels
from headlab.parts import Context


def _batch(name: str = "llama_gqa", n: int = 3) -> hl.Batch:
    ids = tiny_models.inputs(name, batch=n)["input_ids"]
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, 5:] = True  # [batch, pos]
    return hl.Batch(input_ids=ids, target_mask=mask)


# --- the objective --------------------------------------------------------------------------


def test_open_gates_reproduce_the_clean_loss():
    model = tiny_models.build("llama_gqa")
    layout, batch = hl.describe(model), _batch()
    theta = torch.full((2, layout.n_layers, layout.n_heads), 30.0)  # sigmoid(30) == 1 in fp32
    with frozen(model), torch.no_grad():
        nll, valid = masked_nll(model, batch, loss_targets(batch), torch.sigmoid(theta), layout)
    clean = hl.evaluate(model, batch, ["ce"])["ce"].per_example
    assert valid.all()
    torch.testing.assert_close(nll, clean.expand(2, -1), rtol=1e-5, atol=1e-5)
    summary = gate_nll(model, batch, {"open": torch.sigmoid(theta)}, layout=layout)
    assert summary["nll"].to_numpy() == pytest.approx([float(clean.mean())] * 3, rel=1e-5)


@pytest.mark.parametrize("family", sorted(tiny_models.ALL))
def test_open_gates_reproduce_the_clean_loss_on_every_family(family):
    model = tiny_models.build(family)
    layout = hl.describe(model)
    inputs = tiny_models.inputs(family, batch=3)
    if family in tiny_models.VISION:
        batch, metric = (
            hl.Batch(pixel_values=inputs["pixel_values"], labels=torch.tensor([0, 3, 4])),
            "cls_ce",
        )
    elif family in tiny_models.ENCODERS:
        batch = hl.mlm_batch(
            inputs["input_ids"], mask_token_id=4, vocab_size=tiny_models.VOCAB, rate=0.3
        )
        metric = "mlm_ce"
    else:
        batch, metric = _batch(family), "ce"
    gates = torch.ones(2, layout.n_layers, layout.n_heads)
    with torch.no_grad():
        nll, valid = masked_nll(model, batch, loss_targets(batch), gates, layout)
    clean = hl.evaluate(model, batch, [metric])[metric].per_example
    torch.testing.assert_close(nll[:, valid], clean[valid].expand(2, -1), rtol=1e-4, atol=1e-5)
    closed = torch.zeros_like(gates)
    with torch.no_grad():
        shut, _ = masked_nll(model, batch, loss_targets(batch), closed, layout)
    assert not torch.allclose(shut, nll)


def test_answer_targets_score_the_correct_token():
    model = tiny_models.build("gpt2")
    ids = tiny_models.inputs("gpt2", batch=4)["input_ids"]
    batch = hl.Batch(
        input_ids=ids,
        target_mask=torch.zeros_like(ids, dtype=torch.bool),
        answer_pos=torch.tensor([11, 9, 11, 4]),
        correct=torch.tensor([5, 6, 7, 8]),
    )
    with torch.no_grad():
        nll, _ = masked_nll(model, batch, loss_targets(batch), None, hl.describe(model))
    want = hl.evaluate(model, batch, ["answer_logprob"])["answer_logprob"].per_example
    torch.testing.assert_close(nll[0], -want, rtol=1e-5, atol=1e-5)


def test_stacked_masks_act_on_their_own_copy():
    model = tiny_models.build("qwen2")
    layout, batch = hl.describe(model), _batch("qwen2")
    gates = torch.stack([torch.ones(2, 4), torch.zeros(2, 4)])  # [mask, layer, head]
    with torch.no_grad():
        nll, _ = masked_nll(model, batch, loss_targets(batch), gates, layout)
    plan = hl.Plan.heads(layout.heads(), hl.Zero())
    torch.testing.assert_close(nll[0], hl.evaluate(model, batch, ["ce"])["ce"].per_example)
    torch.testing.assert_close(
        nll[1], hl.evaluate(model, batch, ["ce"], plan=plan)["ce"].per_example
    )
    with pytest.raises(hl.HeadlabError, match="MaskGate"):
        MaskGate(torch.ones(2, 3)).apply(torch.ones(4, 1, 4, 2), None, None)


def test_gradient_matches_finite_differences():
    model = tiny_models.build("gpt2").double()  # GPT-2 computes its norms in the model dtype
    layout, batch = hl.describe(model), _batch("gpt2")
    data = nll_pass(model, batch, loss_targets(batch), layout, rows_per_forward=2)  # 2 chunks
    theta0 = torch.randn(2, layout.n_layers, layout.n_heads, dtype=torch.float64) * 2
    lam = 0.3

    def loss(theta: torch.Tensor) -> float:
        nll = data(torch.sigmoid(theta), False)["nll"]
        return float((nll + chg_penalty(theta, lam)).mean())

    with frozen(model):
        theta = theta0.clone().requires_grad_(True)
        accumulate_gradient(lambda: torch.sigmoid(theta), lambda: chg_penalty(theta, lam), data)
        assert not any(p.requires_grad for p in model.parameters())
        with torch.no_grad():
            for idx in [(0, 0, 0), (1, 1, 3), (0, 1, 2)]:
                step = torch.zeros_like(theta0)
                step[idx] = 1e-6
                fd = (loss(theta0 + step) - loss(theta0 - step)) / 2e-6
                assert fd == pytest.approx(float(theta.grad[idx]), rel=1e-5, abs=1e-9)
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())  # restored


@pytest.mark.parametrize("lam", [0.1, -0.1])
def test_regulariser_sign_follows_the_official_code(lam):
    theta = torch.zeros(1, 2, 3, requires_grad=True)

    def no_data(gates: torch.Tensor, train: bool) -> dict[str, torch.Tensor]:
        gates.grad = torch.zeros_like(gates)
        return {"nll": torch.zeros(1)}

    curve = optimise(
        [theta],
        lambda: torch.sigmoid(theta),
        lambda: chg_penalty(theta, lam),
        no_data,
        steps=3,
        lr=1.0,
    )
    # lam > 0 rewards large gates (keep heads), lam < 0 small ones (remove heads)
    assert (torch.sign(theta.detach()) == math.copysign(1, lam)).all()
    assert list(curve.columns[:4]) == ["step", "mask", "penalty", "loss"]


def test_taxonomy_labels_and_scores():
    hi, lo = 0.97, 0.03
    g_plus = torch.tensor([[[hi, lo, hi, lo]], [[hi, lo, hi, 0.6]]])  # [mask, layer, head]
    g_minus = torch.tensor([[[hi, lo, lo, hi]], [[hi, lo, lo, hi]]])
    t = head_taxonomy(torch.zeros_like(g_plus), torch.logit(g_plus), torch.logit(g_minus))
    assert list(t["label"]) == ["facilitating", "interfering", "irrelevant", "unstable"]
    assert t["facilitating"].tolist() == pytest.approx(t["g_minus"].tolist())
    assert t["interfering"].tolist() == pytest.approx((1 - t["g_plus"]).tolist())
    assert t["irrelevant"].tolist() == pytest.approx((t["g_plus"] - t["g_minus"]).tolist())
    assert t["agreement"].tolist() == [1.0, 1.0, 1.0, 0.5]  # mask 1 calls head 3 facilitating
    assert t.loc[3, "g_plus_sd"] == pytest.approx(np.std([lo, 0.6], ddof=1))
    assert {"layer", "head", "n_masks", "facilitating_sd"} <= set(t.columns)
    ranked = head_taxonomy(*(torch.tensor([[[20.0, 30.0]]]),) * 3)  # float32 gates: both 1.0
    assert ranked["facilitating"][1] > ranked["facilitating"][0]


# --- contrastive and L0 -------------------------------------------------------------------------


def test_contrastive_objective_is_the_documented_bounded_hinge():
    model = tiny_models.build("llama_gqa")
    layout, retain = hl.describe(model), _batch()
    forget = _batch(n=4)
    forget = hl.Batch(input_ids=forget.input_ids.flip(1), target_mask=forget.target_mask)
    gates = torch.rand(2, layout.n_layers, layout.n_heads)
    margin = 0.05
    with torch.no_grad():
        got = contrastive_pass(model, retain, forget, layout, margin, 64)(gates, False)
        nll_r, _ = masked_nll(model, retain, loss_targets(retain), gates, layout)
        nll_f, _ = masked_nll(model, forget, loss_targets(forget), gates, layout)
    ref = nll_r.mean(1, keepdim=True)  # [mask, 1]
    want = ref[:, 0] + torch.clamp(ref - nll_f, min=-margin).mean(1)
    torch.testing.assert_close(got["loss"], want.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["forget_nll"], nll_f.mean(1).double(), rtol=1e-5, atol=1e-6)


def test_hard_concrete_gates_and_penalty():
    cfg = L0Config()
    la = torch.tensor([[-10.0, 0.0, 10.0]])
    assert hard_concrete_test(la, cfg)[0].tolist() == pytest.approx([0.0, 0.5, 1.0])
    u = torch.rand(2000, 1, 3, generator=torch.Generator().manual_seed(0)).clamp(1e-6, 1 - 1e-6)
    g = hard_concrete(la, u, cfg)  # [sample, layer, head]
    assert float(g.min()) == 0.0 and float(g.max()) == 1.0
    p_closed = 1 / (1 + math.exp(-0.33 * math.log(1 / 11)))  # P(s (r - l) + l <= 0) at log a = 0
    assert float((g[:, 0, 1] == 0).float().mean()) == pytest.approx(p_closed, abs=0.03)
    shift = 0.33 * math.log(0.1 / 1.1)
    want = sum(min(max(1 / (1 + math.exp(-(a - shift))), 1e-6), 1 - 1e-6) for a in (-10, 0, 10))
    assert float(l0_penalty(la, cfg)) == pytest.approx(want)


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lam", "match"),
    [(0.0, "magnitude"), (-0.1, "magnitude"), (1e6, "too large"), (float("nan"), "finite")],
)
def test_chg_rejects_nonsense_lambda(lam, match):
    with pytest.raises(hl.ConfigError, match=match):
        CHGConfig(lam=lam)


def test_l0_rejects_nonsense_lambdas():
    for lams, match in (
        ([], "at least one"),
        ([-1.0], "negative"),
        ([1e9], "absurdly"),
        ([0.1, 0.1], "repeat"),
    ):
        with pytest.raises(hl.ConfigError, match=match):
            check_l0_lambdas(lams)


def test_fits_are_picklable_parts_that_reproduce_the_analyses():
    """Each fit is a part: picklable (so it can run in another process) and, run from a Context,
    it gives the same numbers as chg / contrastive_chg / l0_sweep."""
    model = tiny_models.build("llama_gqa")
    layout, batch = hl.describe(model), _batch()
    other = hl.Batch(input_ids=batch.input_ids.flip(0), target_mask=batch.target_mask)
    ctx = Context(model, layout, batch, batches={"forget": other})
    config = CHGConfig(steps=2, n_masks=2)
    res = chg(model, batch, config, layout=layout)
    zero = CHGFitPart("zero", config)
    theta, curve = pickle.loads(pickle.dumps(zero)).run(ctx)
    torch.testing.assert_close(theta, res.thetas["zero"], rtol=0, atol=0)
    plus = pickle.loads(pickle.dumps(CHGFitPart("plus", config, theta)))
    assert plus.key == "curve-plus" and plus.cost(ctx) == 2
    torch.testing.assert_close(plus.run(ctx)[0], res.thetas["plus"], rtol=0, atol=0)
    pd.testing.assert_frame_equal(curve, res.curves[res.curves["fit"] == "zero"])
    with pytest.raises(ValueError, match="start from the zero fit"):
        CHGFitPart("minus", config)
    cconfig = ContrastConfig(steps=2, n_masks=1)
    got = pickle.loads(pickle.dumps(ContrastPart(cconfig))).run(ctx)
    want = contrastive_chg(model, batch, other, cconfig, layout=layout)
    torch.testing.assert_close(got.theta, want.theta, rtol=0, atol=0)
    lconfig = L0Config(steps=2)
    part = pickle.loads(pickle.dumps(L0FitPart(0.5, lconfig)))
    log_alpha, curve = part.run(ctx)
    sweep = l0_sweep(model, batch, [0.5], lconfig, layout=layout)
    assert part.key == "curve-lam0.5"
    torch.testing.assert_close(log_alpha, sweep.log_alphas[0.5], rtol=0, atol=0)
    pd.testing.assert_frame_equal(curve, sweep.curves)


def test_empty_loss_mask_and_identical_sets_are_refused():
    model = tiny_models.build("llama_gqa")
    ids = _batch().input_ids
    empty = hl.Batch(input_ids=ids, target_mask=torch.zeros_like(ids, dtype=torch.bool))
    with pytest.raises(hl.ConfigError, match="selects no tokens"):
        chg(model, empty, CHGConfig(steps=1, n_masks=1))
    with pytest.raises(hl.ConfigError, match="identical"):
        contrastive_chg(model, _batch(), _batch())


# --- a planted circuit ----------------------------------------------------------------------
# One layer, four heads, task "abab...": predicting a token needs the previous one. During
# training only head 0 is on, so it alone carries the task; heads 1 and 3 stay untrained (their
# output is tiny); head 2 is then made harmful: a copy of head 0 whose output projection is
# replaced with large random columns, injecting token-dependent noise.

VOCAB, SEQ = 24, 12


def _pairs(n: int, seed: int) -> hl.Batch:
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(2, VOCAB, (n,), generator=g)
    b = (a - 2 + torch.randint(1, VOCAB - 2, (n,), generator=g)) % (VOCAB - 2) + 2
    ids = torch.stack([a, b], 1).repeat(1, SEQ // 2)  # [batch, pos]
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, 2:] = True
    return hl.Batch(input_ids=ids, target_mask=mask)


@pytest.fixture(scope="module")
def planted():
    torch.manual_seed(0)
    cfg = tf.GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=1,
        n_head=4,
        n_positions=SEQ,
        n_inner=32,
        attn_pdrop=0,
        resid_pdrop=0,
        embd_pdrop=0,
        bos_token_id=0,
        eos_token_id=1,
    )
    model = tf.GPT2LMHeadModel(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    others_off = hl.Plan.heads([(0, 1), (0, 2), (0, 3)], hl.Zero())
    for step in range(100):
        ids = _pairs(32, step).input_ids
        with hl.intervene(model, others_off):
            logits = model(input_ids=ids).logits
        loss = -torch.log_softmax(logits[:, 1:-1], -1).gather(2, ids[:, 2:, None]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval().requires_grad_(False)
    attn, layout = model.transformer.h[0].attn, hl.describe(model)
    d = layout.d_head
    for part in range(3):  # q, k, v of head 2 := those of head 0
        src, dst = slice(part * 32, part * 32 + d), slice(part * 32 + 2 * d, part * 32 + 3 * d)
        attn.c_attn.weight[:, dst] = attn.c_attn.weight[:, src]
        attn.c_attn.bias[dst] = attn.c_attn.bias[src]
    cols = layout.out_weight_columns(0, 2)  # [d_model, d_head] view
    cols.copy_(torch.randn(cols.shape, generator=torch.Generator().manual_seed(3)) * 0.6)
    return model, _pairs(16, 10_000)


@pytest.mark.slow
def test_planted_circuit_is_recovered(planted):
    model, batch = planted
    ce = hl.evaluate(model, batch, ["ce"])["ce"].mean
    zero = {
        h: hl.evaluate(model, batch, ["ce"], plan=hl.Plan.of({(0, h): hl.Zero()}))["ce"].mean
        for h in range(4)
    }
    assert zero[0] > ce + 2 and zero[2] < ce - 0.5  # head 0 needed, head 2 harmful
    res = chg(model, batch, CHGConfig(steps=40, n_masks=2, lam=0.01, rows_per_forward=64))
    labels = dict(zip(res.table["head"], res.table["label"], strict=True))
    assert labels == {0: "facilitating", 1: "irrelevant", 2: "interfering", 3: "irrelevant"}
    assert (res.table["agreement"] == 1).all()
    minus = res.summary[res.summary["gates"] == "minus"]["nll"]
    assert (minus < ce).all()  # the sparse G- circuit is sufficient (it even drops the noise)
    val = validate_labels(model, batch, res.table, k=1, n_random=4, seed=1)
    eff = val.groupby("group")["effect"]
    assert eff.mean()["facilitating"] > eff.mean()["random"]
    assert eff.mean()["interfering"] < 0  # removing the harmful head helps
    assert set(label_groups(res.table, k=1, n_random=2)) == {
        "facilitating",
        "interfering",
        "random:0",
        "random:1",
    }


@pytest.mark.slow
def test_l0_keeps_the_needed_head_where_the_task_works(planted):
    model, batch = planted
    res = l0_sweep(model, batch, [0.0, 0.02], L0Config(steps=60, lr=0.3, rows_per_forward=64))
    heads = res.heads.set_index(["lam", "head"])
    assert heads.loc[(0.0, 0), "kept"] and heads.loc[(0.0, 2), "gate"] < 0.1
    assert heads.loc[0.02]["kept"].tolist() == [True, False, False, False]  # only the needed head
    row = res.table.set_index("lam").loc[0.02]
    assert row["n_kept"] == 1 and row["value"] < row["baseline"] - 1  # and the task works
    assert isinstance(res.table, pd.DataFrame) and set(res.log_alphas) == {0.0, 0.02}


# --- the ground-truth induction model (tests/fixtures, issue 5) ---------------------------------


@pytest.fixture(scope="module")
def harmed_ground_truth():
    """The fixture model with distractor 1.0 made harmful: a copy of induction head 1.3's
    queries, keys and values whose output projection is replaced with random columns."""
    gt = pytest.importorskip("fixtures.ground_truth")
    model, _ = hl.load_model(gt.FOLDER)  # a fresh copy: the shared one is never modified
    layout = hl.describe(model)
    attn, d = model.model.layers[1].self_attn, layout.d_head
    with torch.no_grad():
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj):  # weight: [head * d_head, d_model]
            proj.weight[0:d] = proj.weight[3 * d : 4 * d]
        cols = layout.out_weight_columns(1, 0)  # [d_model, d_head] view
        cols.copy_(torch.randn(cols.shape, generator=torch.Generator().manual_seed(3)) * 0.5)
    return gt, model, gt.induction(16)[0]


@pytest.mark.slow
def test_ground_truth_circuit_is_facilitating_and_the_harmful_head_interfering(
    harmed_ground_truth,
):
    gt, model, batch = harmed_ground_truth
    clean = hl.evaluate(model, batch, ["ce"])["ce"].mean
    fixed = hl.evaluate(model, batch, ["ce"], plan=hl.Plan.of({(1, 0): hl.Zero()}))["ce"].mean
    assert clean > fixed + 0.3  # the planted head hurts
    # lam scaled to the paper's per-head pressure (0.1 over ~500 heads; here 8 heads)
    res = chg(model, batch, CHGConfig(steps=40, n_masks=2, lam=0.002, rows_per_forward=64))
    label = res.table.set_index(["layer", "head"])["label"]
    assert all(label[h] == "facilitating" for h in gt.CIRCUIT)
    assert label[(1, 0)] == "interfering"
    assert not any(label[h] == "facilitating" for h in gt.DISTRACTORS)


@pytest.mark.slow
def test_l0_keeps_the_ground_truth_circuit_where_the_task_works(harmed_ground_truth):
    gt, model, batch = harmed_ground_truth
    res = l0_sweep(model, batch, [0.01, 0.03], L0Config(steps=60, rows_per_forward=64))
    for lam in (0.01, 0.03):
        kept = res.heads[(res.heads["lam"] == lam) & res.heads["kept"]]
        assert set(zip(kept["layer"], kept["head"], strict=True)) == set(gt.CIRCUIT)
    assert (res.table["value"] < 0.1).all()  # copying works (chance: 4.16 nats)
