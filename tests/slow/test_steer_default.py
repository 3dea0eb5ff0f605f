"""Steering on the real default model (slow, small): rescaled generation against scaled weights,
and the pursuit ranking with and without the random-dictionary control."""

from __future__ import annotations

import pytest
from oracles import edited

from headlab.analyses.steer.concepts import CONCEPTS, concept_tokens
from headlab.analyses.steer.generate import GenerateConfig, encode_prompts, generate_ids
from headlab.analyses.steer.select import concept_batch, control_token_sets, pursuit_scores
from headlab.models.load import load_model

pytestmark = pytest.mark.slow

HEADS = [(29, 7), (29, 6)]


@pytest.fixture(scope="module")
def smol():
    return load_model("smollm2-135m")


def test_rescaled_generation_on_the_real_model(smol):
    model, tok = smol
    prompts = encode_prompts(model, tok, CONCEPTS["colours"].prompts[:2], 8)
    cfg = GenerateConfig(max_new_tokens=8, greedy=True)
    kw = {"pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id}
    plain = generate_ids(model, prompts, cfg, **kw)
    assert generate_ids(model, prompts, cfg, heads=HEADS, alpha=1.0, **kw) == plain
    oracle = edited(model, [(ly, h, "scale", 3.0) for ly, h in HEADS])
    assert generate_ids(model, prompts, cfg, heads=HEADS, alpha=3.0, **kw) == generate_ids(
        oracle, prompts, cfg, **kw
    )


def test_pursuit_needs_the_random_dictionary_control(smol):
    model, tok = smol
    c = CONCEPTS["colours"]
    ids = concept_tokens(tok, c.words).token_ids
    batch = concept_batch(tok, c.select_prompts)
    controls = control_token_sets(tok, len(ids), 2, exclude=ids)
    table = pursuit_scores(model, batch, ids, controls=controls)
    raw = table.sort_values("score", ascending=False).head(3)
    # layer-0 heads top the raw score but random tokens explain them almost as well
    assert set(raw["layer"]) == {0} and (raw["control"] > 0.15).all()
    top = {(int(r.layer), int(r.head)) for r in table.head(2).itertuples()}
    assert top == set(HEADS) and (table.head(2)["value"] > 0.08).all()
    assert (table.iloc[2:]["value"] < 0.06).all()
