"""``embed_cos``, the metric of models without an LM head, against a float64 numpy reference on a
tiny bare BERT (clean and zero-ablated by a weight-edit oracle, with padding), and what a bare
encoder gets from ``prepare`` and the command line: ``embed_cos`` by default, ``[CLS] ... [SEP]``
blocks, and errors naming the fix for what cannot apply."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import tiny_models as T
import torch
import transformers as tf
from oracles import edited

import headlab as hl
from headlab.cli.app import main
from headlab.engine import run_plans
from headlab.errors import ConfigError
from headlab.jobs.inputs import Inputs, prepare
from headlab.metrics import get_metric, sentence_embedding


def _bare_bert(seed: int = 0) -> tf.BertModel:
    torch.manual_seed(seed)
    model = tf.BertModel(tf.BertConfig(vocab_size=T.VOCAB, **T._COMMON), add_pooling_layer=False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _padded_batch(n: int = 5) -> hl.Batch:
    ids = T.inputs("bert", batch=n)["input_ids"]
    mask = torch.ones_like(ids)
    mask[1, -4:] = 0  # right padding: these positions must not enter the mean
    mask[3, -1:] = 0
    return hl.Batch(input_ids=ids, attention_mask=mask)


def _hidden(model, batch: hl.Batch) -> np.ndarray:
    with torch.no_grad():
        return model(**batch.model_inputs()).last_hidden_state.double().numpy()


def _reference(hidden: np.ndarray, clean: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """1 - cos of the masked means, in float64, from the definition."""
    w = mask[..., None].astype(np.float64)  # [batch, pos, 1]
    a = (hidden * w).sum(1) / w.sum(1)
    b = (clean * w).sum(1) / w.sum(1)
    cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    return 1.0 - cos


def test_embed_cos_matches_float64_reference_clean_and_ablated():
    model, batch = _bare_bert(), _padded_batch()
    heads = [(0, 1), (1, 3)]
    plans = [hl.Plan()] + [hl.Plan.of({h: hl.Zero()}) for h in heads]
    scores = run_plans(model, batch, plans, ["embed_cos"], batch_size=2)
    clean = _hidden(model, batch)
    mask = batch.attention_mask.numpy()
    # the clean run is scored by the same formula against itself: exactly 0
    assert torch.equal(scores[0]["embed_cos"].per_example, torch.zeros(len(batch)))
    for (layer, head), sc in zip(heads, scores[1:], strict=True):
        oracle = edited(model, [(layer, head, "zero", None)])
        want = _reference(_hidden(oracle, batch), clean, mask)
        got = sc["embed_cos"].per_example.double().numpy()
        assert want.min() > 1e-4  # the ablation moves every embedding: the test can fail
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)
        assert sc["embed_cos"].mean == pytest.approx(float(want.mean()), rel=1e-4)


def test_padding_never_enters_the_embedding():
    """Changing the tokens under padding changes neither the embedding nor the score."""
    model, batch = _bare_bert(), _padded_batch()
    other = batch.input_ids.clone()
    other[1, -4:] = 5
    swapped = hl.Batch(input_ids=other, attention_mask=batch.attention_mask)
    h1 = torch.from_numpy(_hidden(model, batch))
    h2 = torch.from_numpy(_hidden(model, swapped))
    e1, e2 = (sentence_embedding(h, batch.attention_mask) for h in (h1, h2))
    torch.testing.assert_close(e1, e2, rtol=0, atol=1e-6)
    assert torch.allclose(e1.norm(dim=-1), torch.ones(len(batch), dtype=e1.dtype))
    plan = hl.Plan.of({(1, 0): hl.Zero()})
    a = hl.evaluate(model, batch, ["embed_cos"], plan=plan)["embed_cos"].per_example
    b = hl.evaluate(model, swapped, ["embed_cos"], plan=plan)["embed_cos"].per_example
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_metrics_that_read_what_the_model_does_not_return_are_refused():
    batch = _padded_batch()
    with pytest.raises(ConfigError, match=r"bare model.*embed_cos"):
        hl.evaluate(_bare_bert(), batch, ["ce"])
    with pytest.raises(ConfigError, match="has a head"):
        hl.evaluate(T.build("bert"), batch, ["embed_cos"])
    with pytest.raises(ConfigError, match="clean run"):
        get_metric("embed_cos")(torch.zeros(2, 3, 4), batch.slice(0, 2), None)


# --- a bare encoder through prepare and the command line -----------------------------------------


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    """A bare BERT with a real (character-level) WordPiece tokenizer, saved as a model folder."""
    path = tmp_path_factory.mktemp("bert") / "model"
    path.mkdir()
    chars = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789.,:;()[]'\"-_=+*/<>!?#"))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{c}" for c in chars)]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = tf.BertTokenizerFast(vocab_file=str(path / "vocab.txt"))
    torch.manual_seed(0)
    config = tf.BertConfig(vocab_size=len(vocab), **T._COMMON)
    tf.BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_a_bare_encoder_gets_embed_cos_and_cls_sep_blocks(bert_folder):
    prepared = prepare(Inputs(model=str(bert_folder), seq_len=16, n_blocks=3, n_stats_blocks=4))
    assert prepared.metrics == ["embed_cos"]
    tok = prepared.tokenizer
    for batch in (prepared.eval, prepared.stats_batch):
        assert (batch.input_ids[:, 0] == tok.cls_token_id).all()
        assert (batch.input_ids[:, -1] == tok.sep_token_id).all()
        assert not batch.target_mask[:, [0, -1]].any()


def test_the_command_line_runs_a_bare_encoder_and_refuses_what_cannot_apply(
    bert_folder, tmp_path, capsys
):
    common = ["--model", str(bert_folder), "--seq-len", "16", "--n-blocks", "2", "--quiet"]
    out = tmp_path / "sweep"
    assert main(["sweep", *common, "--n-stats-blocks", "4", "--method", "zero,mean",
                 "--out", str(out)]) == 0  # fmt: skip
    table = pd.read_parquet(out / "results.parquet")
    assert set(table["metric"]) == {"embed_cos"}
    assert (table["baseline"] == 0).all() and (table["value"] > 0).all()
    capsys.readouterr()
    assert main(["sweep", *common, "--task", "names", "--out", str(tmp_path / "t")]) == 2
    assert "without an LM head" in capsys.readouterr().err
    assert main(["sweep", *common, "--metric", "ce", "--method", "zero",
                 "--out", str(tmp_path / "c")]) == 2  # fmt: skip
    assert "embed_cos" in capsys.readouterr().err
    assert main(["steer", "--model", str(bert_folder), "--concept", "colours", "--select", "heads",
                 "--heads", "1.3", "--data", "none", "--out", str(tmp_path / "s"),
                 "--quiet"]) == 2  # fmt: skip
    assert "cannot generate text" in capsys.readouterr().err
