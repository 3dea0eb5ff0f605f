"""Clean and ablated cross-entropy of the real default model against float64 references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from oracles import edited

import headlab as hl
from headlab.models.load import load_model

pytestmark = pytest.mark.slow


def _ce64(logits: torch.Tensor, batch: hl.Batch) -> float:
    x = logits[:, :-1].double().numpy()  # [batch, pos-1, vocab]: position t predicts t+1
    x = x - x.max(-1, keepdims=True)
    lp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    tgt = batch.input_ids[:, 1:].numpy()
    rows, cols = np.nonzero(batch.target_mask[:, 1:].numpy())
    return float(-lp[rows, cols, tgt[rows, cols]].mean())


def test_clean_ce_and_sweep_deltas_match_float64_on_the_default_model():
    model, tok = load_model("smollm2-135m")
    batch, _ = hl.make_blocks(tok, hl.load_texts("python-docs"), seq_len=32, n_blocks=2)
    with torch.no_grad():
        clean_logits = model(input_ids=batch.input_ids).logits
    want_clean = _ce64(clean_logits, batch)
    got_clean = hl.evaluate(model, batch, ["ce"])["ce"].mean
    # the old clean path (F.cross_entropy on [batch, vocab, pos]) was 1.5e-4 nats off here
    assert abs(got_clean - want_clean) <= 1e-5 * want_clean
    heads = [(0, 3), (16, 0), (29, 8)]
    table = hl.sweep(model, batch, methods=["zero"], metrics=["ce"], heads=heads)
    for layer, head in heads:
        with torch.no_grad():
            oracle = edited(model, [(layer, head, "zero", None)])(input_ids=batch.input_ids).logits
        want = _ce64(oracle, batch) - want_clean
        row = table[(table["layer"] == layer) & (table["head"] == head)].iloc[0]
        assert abs(float(row.delta) - want) <= 1e-5 * want_clean, (layer, head, row.delta, want)
