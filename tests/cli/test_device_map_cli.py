"""`headlab sweep --device-map ... --offload-folder ...` on a tiny local model split over the CPU
and the disk: the same results.parquet as unsplit, the same run (it resumes with or without the
options), and clear errors for placements that cannot work."""

from __future__ import annotations

import json

import pandas as pd
import pytest

import headlab as hl
from headlab.cli.app import main
from headlab.jobs import inputs as inputs_module
from headlab.runs import RunDir


def args(folder, out, *extra):
    return [
        "sweep", "--model", folder, "--data", "python-docs", "--seq-len", "16",
        "--n-blocks", "3", "--n-stats-blocks", "4", "--method", "zero,mean,peak",
        "--metric", "ce,kl", "--out", str(out), "--quiet", "--batch-size", "2", *extra,
    ]  # fmt: skip


@pytest.fixture
def placements(monkeypatch):
    """The device map of every model the jobs load (``None``: not dispatched)."""
    seen = []
    real = inputs_module.load_model

    def spy(*a, **kw):
        model, tok = real(*a, **kw)
        seen.append(getattr(model, "hf_device_map", None))
        return model, tok

    monkeypatch.setattr(inputs_module, "load_model", spy)
    return seen


def split(tmp_path):
    """A CPU budget of 100 kB (the tiny model holds about 175 kB): the rest goes to disk."""
    return ["--device-map", "sequential", "--max-memory", "cpu=100KB",
            "--offload-folder", str(tmp_path / "offload")]  # fmt: skip


@pytest.fixture(scope="module")
def unsplit(tiny_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "unsplit"
    assert main(args(tiny_folder, out)) == 0
    return out


def test_split_sweep_writes_the_same_run(tiny_folder, unsplit, tmp_path, placements):
    out = tmp_path / "split"
    assert main(args(tiny_folder, out, *split(tmp_path))) == 0
    assert {"cpu", "disk"} <= set(placements[-1].values())
    pd.testing.assert_frame_equal(
        pd.read_parquet(out / "results.parquet"),
        pd.read_parquet(unsplit / "results.parquet"),
        check_exact=True,
    )
    manifest = json.loads((out / "manifest.json").read_text())
    want = json.loads((unsplit / "manifest.json").read_text())
    assert manifest["identity"] == want["identity"]
    assert "device_map" not in json.dumps(manifest["identity"])
    # the Python twin takes the same options
    twin = hl.run_sweep(
        out=tmp_path / "twin", model=tiny_folder, seq_len=16, n_blocks=3, n_stats_blocks=4,
        methods=["zero", "mean", "peak"], metrics=["ce", "kl"], batch_size=2,
        device_map="sequential", max_memory={"cpu": "100KB"}, offload_folder=tmp_path / "off2",
    )  # fmt: skip
    assert {"cpu", "disk"} <= set(placements[-1].values())
    pd.testing.assert_frame_equal(
        twin.table, pd.read_parquet(unsplit / "results.parquet"), check_exact=True
    )


def test_a_run_started_unsplit_resumes_split(tiny_folder, unsplit, tmp_path, monkeypatch):
    out = tmp_path / "resumed"
    real = RunDir.save_part
    calls = {"n": 0}

    def flaky(self, key, table):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the unsplit sweep
        real(self, key, table)

    monkeypatch.setattr(RunDir, "save_part", flaky)
    assert main(args(tiny_folder, out)) == 130
    assert json.loads((out / "manifest.json").read_text())["status"] == "interrupted"
    monkeypatch.setattr(RunDir, "save_part", real)
    assert main(args(tiny_folder, out, *split(tmp_path))) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["resumed"] == 1
    pd.testing.assert_frame_equal(
        pd.read_parquet(out / "results.parquet"),
        pd.read_parquet(unsplit / "results.parquet"),
        check_exact=True,
    )


def test_a_model_too_large_without_offload_is_refused_before_any_work(
    tiny_folder, tmp_path, capsys
):
    out = tmp_path / "too-large"
    argv = args(tiny_folder, out, "--device-map", "auto", "--max-memory", "cpu=1KiB")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "more than the memory allowed (max_memory cpu=1.00 KiB)" in err
    assert "give --offload-folder DIR" in err and "--max-memory" in err
    assert not out.exists()  # no run directory: refused before any work


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--device-map", "everywhere"], "argument --device-map: invalid choice: 'everywhere'"),
        (["--device-map", "auto", "--max-memory", "cpu:2GiB"], "is not DEVICE=SIZE"),
        (["--device-map", "auto", "--max-memory", "cpu=2 bytes"], "not a number with a unit"),
        (["--device", "cuda", "--device-map", "auto"], "--device cuda and --device-map auto both"),
        (["--max-memory", "cpu=2GiB"], "max_memory applies only to a dispatched model"),
        (["--offload-folder", "off"], "offload_folder applies only to a dispatched model"),
    ],
)
def test_bad_placement_options(tiny_folder, tmp_path, capsys, extra, message):
    out = tmp_path / "bad"
    assert main(args(tiny_folder, out, *extra)) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
