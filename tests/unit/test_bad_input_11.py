"""Bad model folders, pickled weights, repeated heads and statistics from another model each get
a clear error that names the problem and the fix."""

from __future__ import annotations

import json
import time

import pytest
import tiny_models as T
import torch
import transformers as tf
from safetensors.torch import load_file

import headlab as hl
from headlab.errors import ConfigError, ModelNotFoundError
from headlab.models import fingerprint, load
from headlab.models.load import load_model, model_fingerprint
from headlab.stats import Stats


def tiny_tokenizer():
    from test_load import tiny_tokenizer as make

    return make()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A saved tiny llama folder (model.safetensors + tokenizer)."""
    path = tmp_path_factory.mktemp("tiny") / "llama"
    T.build("llama_gqa").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def copy_of(folder, dest):
    import shutil

    shutil.copytree(folder, dest)
    return dest


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def to_pickle(path, obj=None):
    """Replace model.safetensors by a pickled pytorch_model.bin (of ``obj`` if given)."""
    state = load_file(path / "model.safetensors")
    (path / "model.safetensors").unlink()
    torch.save(state if obj is None else obj(state), path / "pytorch_model.bin")
    return path


# --- model folders -------------------------------------------------------------------------------


def test_folder_without_weights_says_which_files_a_folder_needs(folder, tmp_path):
    bare = copy_of(folder, tmp_path / "bare")
    (bare / "model.safetensors").unlink()
    with pytest.raises(ModelNotFoundError) as err:
        load_model(bare)
    msg = str(err.value)
    assert f"model folder {bare} has config.json but no weights" in msg
    assert "model.safetensors" in msg and "save_pretrained" in msg


def test_truncated_safetensors_is_reported_as_a_broken_file(folder, tmp_path):
    for name, keep in (("half", 0.5), ("header", 0.0)):
        bad = copy_of(folder, tmp_path / name)
        weights = bad / "model.safetensors"
        data = weights.read_bytes()
        weights.write_bytes(data[: max(5, int(len(data) * keep))])
        with pytest.raises(ModelNotFoundError) as err:
            load_model(bad)
        msg = str(err.value)
        assert f"{weights} is truncated or corrupt" in msg, msg
        assert "copy or download it again" in msg


def test_unknown_model_type_names_it_and_the_transformers_version(folder, tmp_path):
    odd = copy_of(folder, tmp_path / "odd")
    edit_config(odd, model_type="mysterynet")
    with pytest.raises(ConfigError) as err:
        load_model(odd)
    msg = str(err.value)
    assert "model_type 'mysterynet'" in msg and f"transformers {tf.__version__}" in msg
    assert "pip install -U transformers" in msg


def write_custom_code(path):
    (path / "configuration_tiny.py").write_text(
        "from transformers import LlamaConfig\n\n\n"
        "class TinyCustomConfig(LlamaConfig):\n"
        '    model_type = "headlab_tiny_custom"\n'
    )
    (path / "modeling_tiny.py").write_text(
        "from transformers import LlamaForCausalLM\n\n"
        "from .configuration_tiny import TinyCustomConfig\n\n\n"
        "class TinyCustomForCausalLM(LlamaForCausalLM):\n"
        "    config_class = TinyCustomConfig\n"
    )
    edit_config(
        path,
        model_type="headlab_tiny_custom",
        architectures=["TinyCustomForCausalLM"],
        auto_map={
            "AutoConfig": "configuration_tiny.TinyCustomConfig",
            "AutoModelForCausalLM": "modeling_tiny.TinyCustomForCausalLM",
        },
    )


def test_custom_code_folder_is_refused_unless_trusted(folder, tmp_path, monkeypatch):
    import transformers.dynamic_module_utils as dmu

    monkeypatch.setattr(dmu, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    custom = copy_of(folder, tmp_path / "custom")
    write_custom_code(custom)
    with pytest.raises(ConfigError) as err:
        load_model(custom)
    msg = str(err.value)
    assert "custom code" in msg and "modeling_tiny.py" in msg
    assert "--trust-remote-code" in msg and "trust_remote_code=True" in msg
    model, tokenizer = load_model(custom, trust_remote_code=True)
    assert type(model).__name__ == "TinyCustomForCausalLM" and tokenizer is not None
    ids = T.inputs("llama_gqa")["input_ids"]
    reference, _ = load_model(folder)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)


# --- pickled weights -----------------------------------------------------------------------------


def test_pickled_weights_are_refused_unless_allowed(folder, tmp_path):
    pickled = to_pickle(copy_of(folder, tmp_path / "pickled"))
    with pytest.raises(ConfigError) as err:
        load_model(pickled)
    msg = str(err.value)
    assert "pytorch_model.bin" in msg and "pickle" in msg
    assert "--allow-pickle" in msg and "allow_pickle=True" in msg
    assert "save_pretrained" in msg  # the conversion snippet
    model, _ = load_model(pickled, allow_pickle=True)
    reference, _ = load_model(folder)
    ids = T.inputs("llama_gqa")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)
    # the conversion the message suggests works and the folder then loads without the flag
    model.save_pretrained(pickled)
    again, _ = load_model(pickled)
    assert model_fingerprint(again) == model_fingerprint(reference)


def test_pickle_failing_the_weights_only_check_is_named(folder, tmp_path):
    import datetime

    def with_object(state):  # a Python object that is not a tensor: not weights-only
        return {**state, "saved": datetime.datetime(2024, 1, 1)}

    evil = to_pickle(copy_of(folder, tmp_path / "evil"), with_object)
    with pytest.raises(ConfigError) as err:
        load_model(evil, allow_pickle=True)
    msg = str(err.value)
    assert "weights-only" in msg and "pytorch_model.bin" in msg
    assert "safetensors" in msg


# --- repeated heads ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama():
    return T.build("llama_gqa")


def test_repeated_heads_are_refused_by_the_sweep(llama):
    batch = hl.Batch(**T.inputs("llama_gqa"))
    with pytest.raises(ConfigError, match=r"head 0\.1 is given twice; list each head once"):
        hl.sweep(llama, batch, methods=["zero"], heads=[(0, 1), (0, 1)])
    with pytest.raises(ConfigError, match=r"no heads given"):
        hl.sweep(llama, batch, methods=["zero"], heads=[])
    with pytest.raises(ConfigError, match=r"\(layer, head\) pairs of integers"):
        hl.sweep(llama, batch, methods=["zero"], heads=[(0, "a")])


def test_run_sweep_checks_heads_before_any_work(tiny_folder_unit, tmp_path):
    common = dict(
        model=str(tiny_folder_unit), data="python-docs", seq_len=16, n_blocks=1, n_stats_blocks=2,
        methods=["zero"],
    )  # fmt: skip
    for heads, message in (
        ([(0, 1), (0, 1)], r"head 0\.1 is given twice"),
        ([], "no heads given"),
        ([(9, 0)], r"layer 9 is out of range: this model has layers 0\.\.2"),
        ([(0, 7)], r"head 7 is out of range in layer 0"),
    ):
        out = tmp_path / f"run{len(message)}"
        with pytest.raises(ConfigError, match=message):
            hl.run_sweep(out=out, heads=heads, **common)
        assert not out.exists()  # refused before the run directory (and statistics) were made


@pytest.fixture(scope="module")
def tiny_folder_unit(tmp_path_factory):
    from tiny_folder import make_model_folder

    return make_model_folder(tmp_path_factory.mktemp("tiny-llama"))


# --- statistics from another model ---------------------------------------------------------------


def test_statistics_from_another_model_are_refused(llama, tmp_path):
    batch = hl.Batch(**T.inputs("llama_gqa"))
    stats = hl.collect_stats(llama, batch)
    other = T.build("llama_gqa", seed=5)  # same layout, other weights
    mine, theirs = stats.model_fingerprint, load.cached_fingerprint(other)
    plan = hl.Plan.of({(0, 1): hl.Mean()})
    checks = {
        "intervene": lambda s: hl.intervene(other, plan, stats=s).__enter__(),
        "run_plans": lambda s: hl.run_plans(other, batch, [plan], ["ce"], stats=s),
        "sweep": lambda s: hl.sweep(other, batch, methods=["mean"], heads=[(0, 1)], stats=s),
    }
    for name, call in checks.items():
        with pytest.raises(ConfigError) as err:
            call(stats)
        msg = str(err.value)
        assert f"collected on a different model (weights fingerprint {mine[:12]}" in msg, name
        assert f"this model's is {theirs[:12]}" in msg, name
        assert "hl.collect_stats(model, ...)" in msg, name
    # saved and loaded, the fingerprint stays and is still checked
    loaded = Stats.load(stats.save(tmp_path / "stats.safetensors"))
    assert loaded.model_fingerprint == mine
    with pytest.raises(ConfigError, match="collected on a different model"):
        hl.run_plans(other, batch, [plan], ["ce"], stats=loaded)
    # statistics without a fingerprint (older files) are accepted; so are this model's own
    loaded.model_fingerprint = None
    hl.run_plans(other, batch, [plan], ["ce"], stats=loaded)
    hl.run_plans(llama, batch, [plan], ["ce"], stats=stats)


def test_fingerprint_is_computed_once_per_model(monkeypatch):
    model = T.build("llama_gqa")
    batch = hl.Batch(**T.inputs("llama_gqa"))
    calls = []
    real = fingerprint.model_fingerprint
    monkeypatch.setattr(fingerprint, "model_fingerprint", lambda m: calls.append(1) or real(m))
    stats = hl.collect_stats(model, batch)
    plan = hl.Plan.of({(0, 1): hl.Mean(), (1, 2): hl.Peak()})
    for _ in range(3):
        hl.run_plans(model, batch, [plan, hl.Plan.of({(1, 0): hl.Median()})], ["ce"], stats=stats)
    assert len(calls) == 1
    assert getattr(model, load.FINGERPRINT_ATTR) == stats.model_fingerprint
    start = time.perf_counter()
    real(model)
    assert time.perf_counter() - start < 1.0  # sampled: cheap even uncached
