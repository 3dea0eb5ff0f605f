"""Steering on tiny models: rescaled generation against weight-edit oracles, SOMP on synthetic
data, a planted concept head, random controls, word mapping and bad input."""

from __future__ import annotations

import math
from typing import ClassVar

import pytest
import tiny_models as T
import torch
from oracles import edited

import headlab as hl
from headlab.analyses.steer import (
    GenerateConfig,
    SteerConfig,
    conditions,
    generate_ids,
    generate_texts,
    random_sets,
    rescaled,
)
from headlab.analyses.steer.concepts import (
    CONCEPTS,
    Concept,
    concept_rate,
    concept_tokens,
    get_concept,
)
from headlab.analyses.steer.select import (
    ConceptMass,
    concept_dictionary,
    head_contributions,
    pursuit_scores,
    select_heads,
    somp,
    sweep_scores,
)
from headlab.errors import ConfigError

PROMPTS = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16], [20, 21]]
HEADS = [(0, 1), (1, 2)]


@pytest.fixture(scope="module")
def llama():
    return T.build("llama_gqa")


def gen(model, cfg, **kw):
    return generate_ids(model, PROMPTS, cfg, pad_token_id=0, eos_token_id=None, **kw)


# --- rescaled generation ---------------------------------------------------------------------


@pytest.mark.parametrize("greedy", [True, False])
def test_alpha_one_generations_are_bit_identical(llama, greedy):
    cfg = GenerateConfig(max_new_tokens=8, greedy=greedy, seed=3, batch_size=3)
    plain = gen(llama, cfg)
    assert gen(llama, cfg, heads=HEADS, alpha=1.0) == plain
    assert gen(llama, cfg, heads=HEADS, alpha=1.0) == gen(llama, cfg)  # reproducible
    assert gen(llama, cfg, heads=HEADS, alpha=5.0) != plain  # the hook really acts
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        clean = llama(input_ids=ids).logits
        with rescaled(llama, HEADS, 1.0):
            same = llama(input_ids=ids).logits
    assert torch.equal(clean, same)


def test_sampling_is_seeded_per_condition_and_leaves_global_rng_alone(llama):
    cfg = GenerateConfig(max_new_tokens=6, seed=11, batch_size=2)
    first = gen(llama, cfg, heads=HEADS, alpha=2.0)
    gen(llama, GenerateConfig(max_new_tokens=6, seed=99))  # another condition in between
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    assert gen(llama, cfg, heads=HEADS, alpha=2.0) == first
    assert torch.equal(torch.rand(3), before)
    other = gen(llama, GenerateConfig(max_new_tokens=6, seed=12, batch_size=2))
    assert other != gen(llama, GenerateConfig(max_new_tokens=6, seed=11, batch_size=2))


def test_alpha_zero_equals_zero_ablation_and_zeroed_weights(llama):
    ids = torch.tensor(PROMPTS[2:3] * 2)
    with torch.no_grad():
        with rescaled(llama, HEADS, 0.0):
            got = llama(input_ids=ids).logits
        with hl.intervene(llama, hl.Plan.heads(HEADS, hl.Zero())):
            zero = llama(input_ids=ids).logits
        oracle = edited(llama, [(ly, h, "zero", None) for ly, h in HEADS])(input_ids=ids).logits
        clean = llama(input_ids=ids).logits
    assert torch.equal(got, zero)
    assert float((got - oracle).abs().max() / oracle.abs().max()) < 1e-5
    assert float((got - clean).abs().max()) > 1e-3


@pytest.mark.parametrize("alpha", [-1.0, 3.0])
def test_cached_generation_equals_generation_with_scaled_weights(llama, alpha):
    """With a key/value cache every decoded token passes the pre-hook (positions=None), so greedy
    generation under rescaled() equals greedy generation of a model whose W_O columns are
    scaled."""
    cfg = GenerateConfig(max_new_tokens=10, greedy=True)
    oracle = edited(llama, [(ly, h, "scale", alpha) for ly, h in HEADS])
    want = generate_ids(oracle, PROMPTS, cfg, pad_token_id=0)
    assert gen(llama, cfg, heads=HEADS, alpha=alpha) == want
    ids = torch.tensor([PROMPTS[0]])
    with rescaled(llama, HEADS, alpha) as report, torch.no_grad():
        llama.generate(input_ids=ids, max_new_tokens=7, do_sample=False, pad_token_id=0)
    assert report.calls == {0: 7, 1: 7}  # prefill + 6 cached decoding steps, per layer


# --- SOMP and the pursuit score --------------------------------------------------------------


def unit_rows(x):
    return x / x.norm(dim=1, keepdim=True)


def test_somp_recovers_atoms_that_built_x():
    g = torch.Generator().manual_seed(0)
    atoms = unit_rows(torch.randn(8, 20, generator=g, dtype=torch.float64))
    x = torch.randn(12, 2, generator=g, dtype=torch.float64) @ atoms[[2, 5]]  # [12, 20]
    score, chosen = somp(x, atoms, steps=2)
    assert sorted(chosen) == [2, 5]
    assert score == pytest.approx(1.0, abs=1e-12)
    noise = x + 0.3 * torch.randn(12, 20, generator=g, dtype=torch.float64)
    s3, c3 = somp(noise, atoms, steps=3)
    sol = torch.linalg.lstsq(atoms[c3].T, noise.T).solution  # independent least squares
    resid = noise - (atoms[c3].T @ sol).T
    assert s3 == pytest.approx(1 - float((resid**2).sum() / (noise**2).sum()), rel=1e-10)


def test_somp_scores_zero_for_output_orthogonal_to_every_atom():
    g = torch.Generator().manual_seed(1)
    atoms = torch.zeros(5, 16, dtype=torch.float64)
    atoms[:, :5] = unit_rows(torch.randn(5, 5, generator=g, dtype=torch.float64))
    x = torch.zeros(7, 16, dtype=torch.float64)
    x[:, 5:] = torch.randn(7, 11, generator=g, dtype=torch.float64)
    assert somp(x, atoms, steps=3)[0] == pytest.approx(0.0, abs=1e-12)
    assert somp(torch.zeros(3, 16), atoms, steps=2) == (0.0, [])


@pytest.mark.parametrize("family", ["llama_gqa", "gpt2"])
def test_dictionary_is_the_direction_each_centred_logit_reads(family):
    """Logits centred over the vocabulary (softmax ignores the mean) satisfy
    (logit_j - mean_v logit_v)(norm(x)) * rms(x) / |atom_j| = <atom_j, x> (RMSNorm; for
    LayerNorm after its bias term, with rms the standard deviation)."""
    model = T.build(family)
    ids = [3, 17, 40]
    atoms = concept_dictionary(model, ids)
    assert torch.allclose(atoms.norm(dim=1), torch.ones(3, dtype=torch.float64))
    norm = model.model.norm if family == "llama_gqa" else model.transformer.ln_f
    x = torch.randn(4, atoms.shape[1], generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model.get_output_embeddings()(norm(x)).double()  # [4, vocab]
    logits = (full - full.mean(1, keepdim=True))[:, ids]  # [4, 3]
    unembed = model.get_output_embeddings().weight.detach().double()
    w = unembed[ids] - unembed.mean(0)  # [3, d]
    g = norm.weight.detach().double()
    if family == "gpt2":
        logits = logits - (w @ norm.bias.detach().double())
        scale = (x.double().var(1, unbiased=False) + norm.eps).sqrt()  # LayerNorm's sigma
        length = ((w * g) - (w * g).mean(1, keepdim=True)).norm(dim=1)
    else:
        scale = (x.double().pow(2).mean(1) + norm.variance_epsilon).sqrt()
        length = (w * g).norm(dim=1)
    want = logits * scale[:, None] / length  # [4, 3]
    assert torch.allclose(x.double() @ atoms.T, want, rtol=1e-5, atol=1e-6)


def plant(model, layer, head, direction):
    """Make ``head`` write ``z[0] * direction`` (W_O columns: direction, then zeros)."""
    layout = hl.describe(model)
    with torch.no_grad():
        cols = layout.out_weight_columns(layer, head)  # view [d_model, d_head]
        cols.zero_()
        cols[:, 0] = direction.to(cols.dtype)


@pytest.mark.parametrize("positions", ["last", "all"])
def test_planted_concept_head_is_ranked_first_by_pursuit(positions):
    model = T.build("llama_gqa", seed=4)
    ids = [10, 20, 30]
    atoms = concept_dictionary(model, ids)
    plant(model, 1, 2, 4.0 * atoms[1])
    batch = hl.Batch(**T.inputs("llama_gqa", batch=6, seed=5))
    batch = hl.Batch(input_ids=batch.input_ids, answer_pos=torch.full((6,), T.SEQ - 1))
    table = pursuit_scores(model, batch, ids, steps=2, positions=positions, labels=["a", "b", "c"])
    top = table.iloc[0]
    assert (top["layer"], top["head"], top["rank"]) == (1, 2, 1)
    assert top["value"] == pytest.approx(1.0, abs=1e-9) and top["atoms"] == "b"
    assert table.iloc[1:]["value"].max() < 0.6 and set(table.metric) == {"pursuit_score"}
    assert select_heads(table, 1) == [(1, 2)]
    assert len(table) == 8 and set(table["rank"]) == set(range(1, 9))
    controls = [(40, 50, 60), (41, 51, 61)]
    ctl = pursuit_scores(model, batch, ids, steps=2, positions=positions, controls=controls)
    assert select_heads(ctl, 1) == [(1, 2)] and set(ctl.metric) == {"pursuit_vs_random"}
    x = head_contributions(model, batch, positions=positions)[(1, 2)]
    want = sum(somp(x, concept_dictionary(model, c), 2)[0] for c in controls) / 2
    top = ctl.iloc[0]
    assert top["control"] == pytest.approx(want) and top["score"] == pytest.approx(1.0)
    assert top["value"] == pytest.approx(1.0 - want) and top["value"] > 0.5


def test_concept_mass_and_sweep_pick_the_planted_head():
    model = T.build("llama_gqa", seed=4)
    ids = [10, 20, 30]
    batch = hl.Batch(**T.inputs("llama_gqa", batch=4, seed=5))
    batch = hl.Batch(input_ids=batch.input_ids, answer_pos=torch.tensor([11, 11, 9, 11]))
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids).logits
    mass = ConceptMass(tuple(ids))(logits, batch)
    p = logits[torch.arange(4), batch.answer_pos].softmax(-1)[:, ids].sum(-1)
    assert torch.allclose(mass.per_example, p.log(), atol=1e-5)
    # the head's z[0] at the answer positions has one sign here; orient the plant to promote
    acts = hl.record(model, {"input_ids": batch.input_ids})
    z0 = acts[1][torch.arange(4), batch.answer_pos, 2, 0]
    assert bool((z0 > 0).all() or (z0 < 0).all())
    atoms = concept_dictionary(model, ids)
    plant(model, 1, 2, 30.0 * float(z0.sign()[0]) * atoms.sum(0))
    table = sweep_scores(model, batch, ids, batch_size=2)
    top = table.iloc[0]
    assert (top["layer"], top["head"]) == (1, 2) and top["effect"] > 0.3
    assert table.iloc[1]["effect"] < 0.05 * top["effect"]
    assert top["baseline"] == pytest.approx(
        float(ConceptMass(tuple(ids))(model(input_ids=batch.input_ids).logits, batch).mean),
        abs=1e-5,
    )


# --- random controls, conditions -------------------------------------------------------------


def test_random_controls_are_distinct_disjoint_and_reproducible(llama):
    layout = hl.describe(llama)
    sets = random_sets(layout, 3, 4, seed=7, exclude=HEADS)
    assert list(sets) == [7, 8, 9, 10]
    for heads in sets.values():
        assert len(set(heads)) == 3 and not set(heads) & set(HEADS)
    assert random_sets(layout, 3, 4, seed=7, exclude=HEADS) == sets
    assert random_sets(layout, 3, 1, seed=9, exclude=HEADS) == {9: sets[9]}
    assert len({tuple(h) for h in sets.values()}) > 1
    with pytest.raises(ConfigError, match="only 6 are available"):
        random_sets(layout, 7, 1, exclude=HEADS)
    conds = conditions(HEADS, layout, SteerConfig(alphas=(0.0, 2.0), n_random=2, seed=7))
    assert [c.key for c in conds] == [
        "clean-a1",
        "selected-a0",
        "selected-a2",
        "random-s7-a0",
        "random-s7-a2",
        "random-s8-a0",
        "random-s8-a2",
    ]
    assert conds[3].heads == tuple(random_sets(layout, 2, 1, seed=7, exclude=HEADS)[7])


# --- words, rates, concepts ------------------------------------------------------------------


class FakeTokenizer:
    vocab: ClassVar[dict[str, int]] = {" red": 5, "red": 6, " Red": 7, " green": 8, "Green": 9}

    unk_token_id = None

    def __call__(self, text, add_special_tokens=False):
        if text in self.vocab:
            return {"input_ids": [self.vocab[text]]}
        if text.lower().endswith("blue"):
            return {"input_ids": [10, 11] if text.startswith(" ") else [12, 13]}
        return {"input_ids": [1, 2]}


def test_words_map_to_every_single_token_form():
    ct = concept_tokens(FakeTokenizer(), ["red", "green"])
    assert ct.token_ids == (5, 6, 7, 8, 9) and ct.multi_token == ()
    assert list(ct.table.form) == [" red", "red", " Red", " green", "Green"]


def test_multi_token_words_warn_or_are_refused():
    with pytest.warns(UserWarning, match="blue"):
        ct = concept_tokens(FakeTokenizer(), ["red", "blue"])
    assert ct.multi_token == ("blue",) and ct.token_ids == (5, 6, 7, 10)
    assert not ct.table[ct.table.word == "blue"]["single"].iloc[0]
    with pytest.raises(ConfigError, match="blue"):
        concept_tokens(FakeTokenizer(), ["red", "blue"], multi="refuse")


def test_concept_rate_counts_words():
    rate, per, total = concept_rate(
        ["A red, RED car.", "", "greenish Green 3 blue"], ["red", "green"]
    )
    assert total == 4 + 0 + 4
    assert per[0] == pytest.approx(2 / 4) and math.isnan(per[1]) and per[2] == pytest.approx(1 / 4)
    assert rate == pytest.approx(3 / 8)
    # words: He paid 2 5 dollars two of them -> 3 of 8 are numbers
    assert concept_rate(["He paid 25 dollars, two of them"], CONCEPTS["numbers"].words)[:2] == (
        3 / 8,
        [3 / 8],
    )


@pytest.mark.parametrize("name", sorted(CONCEPTS))
def test_builtin_concepts_have_held_out_prompts_without_concept_words(name):
    c = CONCEPTS[name]
    assert len(c.prompts) >= 16 and len(c.select_prompts) >= 16
    assert not set(c.prompts) & set(c.select_prompts)
    for p in c.prompts:
        assert concept_rate([p], c.words)[0] == 0, p


def test_custom_concepts():
    assert get_concept("numbers").name == "numbers"
    sub = get_concept("red,blue")
    assert sub.words == ("red", "blue") and sub.prompts == CONCEPTS["colours"].prompts
    mine = get_concept(["Cat", "dog"], prompts=["My pet is a"])
    assert mine.words == ("cat", "dog") and mine.select_prompts == ("My pet is a",)


# --- bad input -------------------------------------------------------------------------------


def test_bad_input_is_refused_with_a_fix():
    with pytest.raises(ConfigError, match="alpha list is empty"):
        SteerConfig(alphas=())
    with pytest.raises(ConfigError, match=r"unknown concept 'flavours'.*colours"):
        get_concept("flavours")
    with pytest.raises(ConfigError, match="--prompts"):
        get_concept("cat,dog")
    with pytest.raises(ConfigError, match="single words"):
        Concept("x", ("light blue",), ("a",), ("a",))
    with pytest.raises(ConfigError, match="at least one"):
        rescaled(T.build("llama_gqa"), [], 2.0).__enter__()


def test_prompt_longer_than_the_context_is_refused(llama):
    cfg = GenerateConfig(max_new_tokens=8)
    with pytest.raises(ConfigError, match="context of 64 positions"):
        generate_ids(llama, [list(range(3, 60))], cfg, pad_token_id=0)

    class Tok(FakeTokenizer):
        eos_token_id = pad_token_id = bos_token_id = None

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [3] * len(text.split())}

    with pytest.raises(ConfigError, match="shorten it or lower max_new_tokens"):
        generate_texts(llama, Tok(), ["w " * 70], cfg)


def test_summary_and_figure_read_the_table():
    import pandas as pd
    from matplotlib.figure import Figure

    from headlab.analyses.steer import steer_summary, with_baseline
    from headlab.plots.steer import steer_figure

    rows = [("clean", None, 1.0, "concept", "concept_rate", 0.1),
            ("clean", None, 1.0, "docs", "ce", 2.0)]  # fmt: skip
    for a, rate, ce in ((0.0, 0.02, 2.5), (5.0, 0.4, 3.0)):
        rows += [("selected", None, a, "concept", "concept_rate", rate),
                 ("selected", None, a, "docs", "ce", ce)]  # fmt: skip
        for s, r in ((0, 0.1 + a / 100), (1, 0.12 + a / 50)):
            rows += [("random", s, a, "concept", "concept_rate", r),
                     ("random", s, a, "docs", "ce", 2.0 + a / 10)]  # fmt: skip
    raw = pd.DataFrame(
        [[sel, s, a, 0, "", t, m, v, 0.0, 1] for sel, s, a, t, m, v in rows],
        columns=["selection", "seed", "alpha", "n_heads", "heads", "target", "metric", "value",
                 "sd", "n"],
    ).astype({"seed": "Int64"})  # fmt: skip
    table = with_baseline(raw)
    assert list(table.selection[:2]) == ["clean", "clean"]
    ce5 = table[(table.selection == "selected") & (table.alpha == 5.0) & (table.metric == "ce")]
    assert (ce5.baseline.iloc[0], ce5.delta.iloc[0]) == (2.0, 1.0)
    s = steer_summary(table)
    assert list(s.alpha) == [0.0, 5.0] and list(s.selected_rate) == [0.02, 0.4]
    assert s.random_mean[1] == pytest.approx((0.15 + 0.22) / 2)
    assert s.random_sd[1] == pytest.approx(abs(0.22 - 0.15) / math.sqrt(2))
    assert s.d_docs_ce_selected[0] == pytest.approx(0.5) and s.d_docs_ce_random[1] == 0.5
    fig = steer_figure(table, s, title="t")
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    sel_line = next(ln for ln in fig.axes[0].lines if ln.get_color() == "C3")
    assert list(sel_line.get_ydata()) == [0.02, 0.4]
