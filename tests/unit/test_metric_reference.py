"""Every metric against an independent float64 reference, and clean vs intervened scoring.

The references below are written from the definitions (softmax in float64 via numpy), not from
headlab's code. Relative tolerance 1e-5 throughout, as promised in the README.
"""

from __future__ import annotations

import numpy as np
import pytest
import tiny_models as T
import torch
from oracles import edited

import headlab as hl
from headlab.engine import run_plans

REL = 1e-5


def _log_softmax64(logits: torch.Tensor) -> np.ndarray:
    x = logits.detach().double().numpy()
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _reference(name: str, logits: torch.Tensor, batch: hl.Batch, clean: torch.Tensor) -> float:
    """The metric's mean from its definition, in float64."""
    if name in ("ce", "top1", "top5", "kl"):
        lp = _log_softmax64(logits)[:, :-1]  # [batch, pos-1, vocab]: position t predicts t+1
        tgt = batch.input_ids[:, 1:].numpy()
        mask = batch.target_mask[:, 1:].numpy().astype(bool)
        if batch.attention_mask is not None:
            mask &= batch.attention_mask[:, 1:].numpy().astype(bool)
        rows, cols = np.nonzero(mask)
        if name == "ce":
            vals = -lp[rows, cols, tgt[rows, cols]]
        elif name == "kl":
            lq = _log_softmax64(clean)[:, :-1]
            vals = (np.exp(lq) * (lq - lp)).sum(-1)[rows, cols]
        else:
            k = int(name[3:])
            order = np.argsort(-lp[rows, cols], axis=-1)[:, :k]
            vals = (order == tgt[rows, cols][:, None]).any(-1).astype(float)
        return float(vals.mean())
    if name in ("logit_diff", "answer_logprob", "answer_acc"):
        n = len(batch)
        at = logits[torch.arange(n), batch.answer_pos].detach().double().numpy()  # [batch, vocab]
        c, w = batch.correct.numpy(), batch.wrong.numpy()
        if name == "logit_diff":
            vals = at[np.arange(n), c] - at[np.arange(n), w]
        elif name == "answer_logprob":
            vals = _log_softmax64(torch.from_numpy(at))[np.arange(n), c]
        else:
            vals = (at.argmax(-1) == c).astype(float)
        return float(vals.mean())
    if name in ("mlm_ce", "mlm_acc"):
        labels = batch.labels.numpy()
        rows, cols = np.nonzero(labels != -100)
        if name == "mlm_ce":
            return float(-_log_softmax64(logits)[rows, cols, labels[rows, cols]].mean())
        return float((logits.detach().numpy()[rows, cols].argmax(-1) == labels[rows, cols]).mean())
    if name in ("cls_ce", "cls_acc"):
        labels = batch.labels.numpy()
        n = len(labels)
        if name == "cls_ce":
            return float(-_log_softmax64(logits)[np.arange(n), labels].mean())
        return float((logits.detach().numpy().argmax(-1) == labels).mean())
    raise AssertionError(name)


def _close(got: float, want: float) -> None:
    assert abs(got - want) <= REL * max(1.0, abs(want)), (got, want)


def test_token_metrics_on_a_large_vocabulary_match_float64():
    # a 49k-word vocabulary, like the default model's: where F.cross_entropy on the
    # [batch, vocab, pos] layout drifts by ~1e-4 on this CPU build
    g = torch.Generator().manual_seed(0)
    vocab = 49152
    ids = torch.randint(0, vocab, (2, 32), generator=g)
    logits = torch.randn(2, 32, vocab, generator=g) * 4
    clean = logits + torch.randn(2, 32, vocab, generator=g)
    batch = hl.Batch(input_ids=ids, target_mask=torch.ones_like(ids, dtype=torch.bool))
    for name in ("ce", "top1", "top5", "kl"):
        got = hl.get_metric(name)(logits, batch, clean).mean
        _close(got, _reference(name, logits, batch, clean))


def _answer_batch(n: int = 5) -> hl.Batch:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, T.VOCAB, (n, T.SEQ), generator=g)
    return hl.Batch(
        input_ids=ids,
        answer_pos=torch.randint(4, T.SEQ, (n,), generator=g),
        correct=torch.randint(3, T.VOCAB, (n,), generator=g),
        wrong=torch.randint(3, T.VOCAB, (n,), generator=g),
    )


def _token_batch(name: str, n: int = 5) -> hl.Batch:
    ids = T.inputs(name, batch=n)["input_ids"]
    tm = torch.ones_like(ids, dtype=torch.bool)
    tm[:, : T.SEQ // 3] = False
    return hl.Batch(input_ids=ids, target_mask=tm)


def _logits(model, batch: hl.Batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch.model_inputs()).logits


CAUSAL = ["gpt2", "llama_gqa", "gemma2", "opt", "phi"]


@pytest.mark.parametrize("family", CAUSAL)
@pytest.mark.parametrize(
    ("kind", "metrics"),
    [("tokens", ["ce", "top1", "top5", "kl"]), ("answer", ["logit_diff", "answer_logprob"])],
)
def test_clean_and_intervened_values_match_float64_oracles(family, kind, metrics):
    """Clean values and zero-ablation deltas of every metric: engine vs a float64 reference on a
    weight-edited copy (an oracle that shares no code with the engine or the metrics)."""
    model = T.build(family)
    batch = _token_batch(family) if kind == "tokens" else _answer_batch()
    heads = [(0, 1), (1, 2)]
    plans = [hl.Plan()] + [hl.Plan.of({h: hl.Zero()}) for h in heads]
    scores = run_plans(model, batch, plans, metrics, batch_size=2)
    clean_logits = _logits(model, batch)
    for name in metrics:
        want_clean = _reference(name, clean_logits, batch, clean_logits)
        _close(scores[0][name].mean, want_clean)
        for (layer, head), sc in zip(heads, scores[1:], strict=True):
            oracle = edited(model, [(layer, head, "zero", None)])
            want = _reference(name, _logits(oracle, batch), batch, clean_logits)
            _close(sc[name].mean, want)
            delta = sc[name].mean - scores[0][name].mean
            assert abs(delta - (want - want_clean)) <= REL * max(1.0, abs(want_clean))


def test_clean_scores_are_bit_identical_to_an_empty_plan_run():
    """The clean value and an intervened value come from the same code: a plan that changes
    nothing (scale 1) scores exactly like the clean run, for every metric family."""
    model = T.build("llama_gqa")
    tok, ans = _token_batch("llama_gqa"), _answer_batch()
    for batch, metrics in ((tok, ["ce", "top1", "kl"]), (ans, ["logit_diff", "answer_acc"])):
        clean, same = run_plans(
            model, batch, [hl.Plan(), hl.Plan.of({(0, 1): hl.Scale(1.0)})], metrics
        )
        for name in metrics:
            assert clean[name].mean == same[name].mean, name
        assert clean.get("kl") is None or clean["kl"].mean == 0.0


def test_masked_lm_metrics_match_float64():
    model = T.build("bert")
    ids = T.inputs("bert", batch=4)["input_ids"]
    batch = hl.mlm_batch(ids, mask_token_id=2, vocab_size=T.VOCAB, rate=0.3, seed=1)
    scores = hl.evaluate(model, batch, ["mlm_ce", "mlm_acc"])
    logits = _logits(model, batch)
    for name in ("mlm_ce", "mlm_acc"):
        _close(scores[name].mean, _reference(name, logits, batch, logits))
    zeroed = hl.evaluate(model, batch, ["mlm_ce"], plan=hl.Plan.of({(1, 3): hl.Zero()}))
    want = _reference("mlm_ce", _logits(edited(model, [(1, 3, "zero", None)]), batch), batch, None)
    _close(zeroed["mlm_ce"].mean, want)


def test_classification_metrics_match_float64():
    model = T.build("vit")
    pixels = T.inputs("vit", batch=6)["pixel_values"]
    batch = hl.Batch(pixel_values=pixels, labels=torch.tensor([0, 1, 2, 3, 4, 0]))
    scores = hl.evaluate(model, batch, ["cls_ce", "cls_acc"])
    logits = _logits(model, batch)
    for name in ("cls_ce", "cls_acc"):
        _close(scores[name].mean, _reference(name, logits, batch, logits))
    zeroed = hl.evaluate(model, batch, ["cls_ce"], plan=hl.Plan.of({(0, 2): hl.Zero()}))
    want = _reference("cls_ce", _logits(edited(model, [(0, 2, "zero", None)]), batch), batch, None)
    _close(zeroed["cls_ce"].mean, want)
