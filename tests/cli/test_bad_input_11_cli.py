"""Bad numbers, bad ``--heads`` and model folders that need a flag: argparse-style usage errors
(exit 2, no traceback) or one ``headlab: error:`` line, each naming the option and the fix."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from headlab.cli.app import main


def sweep_args(folder, out, *extra):
    return [
        "sweep", "--model", str(folder), "--data", "python-docs", "--seq-len", "16",
        "--n-blocks", "1", "--n-stats-blocks", "2", "--method", "zero", "--metric", "ce",
        "--out", str(out), "--quiet", "--batch-size", "2", *extra,
    ]  # fmt: skip


def usage_error(argv, capsys) -> str:
    """Run ``argv``, expect argparse's exit 2, return stderr (checked to hold no traceback)."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "usage: headlab" in err
    return err


# --- numbers -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--seq-len", "0"),
        ("--seq-len", "-3"),
        ("--n-blocks", "0"),
        ("--n-stats-blocks", "-1"),
        ("--batch-size", "0"),
        ("--batch-size", "two"),
    ],
)
def test_counts_must_be_positive_integers(tmp_path, capsys, option, value):
    argv = sweep_args("unused-model", tmp_path / "out")
    argv[argv.index(option) + 1] = value
    err = usage_error(argv, capsys)
    assert f"{option} must be a positive integer, got {value}" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["prune", "estimate", "gate", "l0", "detect"])
def test_every_command_with_the_shared_options_checks_them(tmp_path, capsys, command):
    err = usage_error([command, "--batch-size", "0", "--out", str(tmp_path / "o")], capsys)
    assert "--batch-size must be a positive integer, got 0" in err
    err = usage_error([command, "--seq-len", "0", "--out", str(tmp_path / "o")], capsys)
    assert "--seq-len must be a positive integer, got 0" in err


def test_demo_names_its_own_option(tmp_path, capsys):
    err = usage_error(["demo", "--n", "0", "--out", str(tmp_path / "demo")], capsys)
    assert "--n must be a positive integer, got 0" in err
    assert "--n-blocks" not in err
    err = usage_error(["demo", "--seq-len", "0", "--out", str(tmp_path / "demo")], capsys)
    assert "--seq-len must be a positive integer, got 0" in err


# --- --heads -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("heads", "message"),
    [
        ("", "no heads given (got '')"),
        (" , ", "no heads given"),
        ("a.b", "LAYER.HEAD pairs separated by commas (e.g. 3.5,10.1), got 'a.b'"),
        ("1-2", "LAYER.HEAD pairs separated by commas (e.g. 3.5,10.1), got '1-2'"),
        ("0.1.2", "got '0.1.2'"),
        ("0.1,0.1", "head 0.1 is given twice; list each head once"),
        ("0.1,0:1", "head 0.1 is given twice"),
        ("-1.0", "layer and head must be >= 0, got '-1.0'"),
    ],
)
def test_bad_heads_are_usage_errors(tmp_path, capsys, heads, message):
    err = usage_error(sweep_args("unused-model", tmp_path / "out", "--heads", heads), capsys)
    assert "argument --heads:" in err and message in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["shift", "cascade", "attention", "steer"])
def test_every_command_with_heads_parses_them_the_same_way(tmp_path, capsys, command):
    argv = [command, "--heads", "0.1,0.1", "--out", str(tmp_path / "o")]
    err = usage_error(argv, capsys)
    assert "argument --heads: head 0.1 is given twice" in err


@pytest.mark.parametrize("command", ["sweep", "shift", "cascade", "steer"])
def test_heads_beyond_the_model_fail_before_any_work(tiny_folder, tmp_path, capsys, command):
    for heads, message in (
        ("0.1,9.0", "layer 9 is out of range: this model has layers 0..2"),
        ("0.7", "head 7 is out of range in layer 0: this model has heads 0..3"),
    ):
        out = tmp_path / heads
        common = ["--model", str(tiny_folder), "--heads", heads, "--out", str(out), "--quiet"]
        data = ["--data", "python-docs", "--seq-len", "16", "--n-blocks", "1"]
        argv = {
            "sweep": sweep_args(tiny_folder, out, "--heads", heads),
            "shift": ["shift", *common, *data, "--n-stats-blocks", "2"],
            "cascade": ["cascade", *common, *data, "--n-stats-blocks", "2", "--off-target", "none"],
            "steer": ["steer", *common, "--data", "none", "--off-task", "none"],
        }[command]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"headlab: error: {message}" in err and "Traceback" not in err
        assert not out.exists()  # no statistics, no run left marked "running"


def test_chosen_heads_are_swept_once(tiny_folder, tmp_path):
    import pandas as pd

    out = tmp_path / "two"
    assert main(sweep_args(tiny_folder, out, "--heads", "1.2,0:1")) == 0
    table = pd.read_parquet(out / "results.parquet")
    assert sorted(zip(table["layer"], table["head"], strict=True)) == [(0, 1), (1, 2)]
    assert json.loads((out / "manifest.json").read_text())["identity"]["heads"] == [[1, 2], [0, 1]]


# --- model folders that need a flag --------------------------------------------------------------


@pytest.fixture
def pickled(tiny_folder, tmp_path):
    folder = shutil.copytree(tiny_folder, tmp_path / "pickled")
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    return folder


def test_pickled_folder_needs_allow_pickle(pickled, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(sweep_args(pickled, out, "--heads", "0.0")) == 2
    err = capsys.readouterr().err
    assert err.startswith("headlab: error: ") and "Traceback" not in err
    assert "pytorch_model.bin" in err and "--allow-pickle" in err and "save_pretrained" in err
    assert not out.exists()
    assert main(sweep_args(pickled, out, "--heads", "0.0", "--allow-pickle")) == 0
    assert (out / "results.parquet").is_file()
    identity = json.loads((out / "manifest.json").read_text())["identity"]
    assert "allow_pickle" not in identity  # how the file was read does not change the numbers


def test_trust_remote_code_is_off_by_default_and_recorded(tiny_folder, tmp_path, capsys):
    custom = shutil.copytree(tiny_folder, tmp_path / "custom")
    config = json.loads((custom / "config.json").read_text())
    config.update(model_type="headlab_unknown_custom", auto_map={"AutoConfig": "cfg.MyConfig"})
    (custom / "config.json").write_text(json.dumps(config))
    assert main(sweep_args(custom, tmp_path / "refused")) == 2
    err = capsys.readouterr().err
    assert "custom code" in err and "--trust-remote-code" in err and "Traceback" not in err
    for flag, expected in (([], False), (["--trust-remote-code"], True)):
        out = tmp_path / f"run-{expected}"
        assert main(sweep_args(tiny_folder, out, "--heads", "0.0", *flag)) == 0
        manifest = json.loads((out / "manifest.json").read_text())
        # recorded in the identity when on (left out when off, as in older releases' runs)
        assert manifest["identity"].get("trust_remote_code", False) is expected
