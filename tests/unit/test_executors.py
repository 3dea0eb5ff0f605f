"""Executors without a cluster: the options every part-splitting command takes, and the errors
for bad input (Ray missing, an unreachable address, bad counts), all before any model loads."""

from __future__ import annotations

import inspect
import sys
import time
from pathlib import Path

import pytest

import headlab as hl
from headlab.cli.app import build_parser, main
from headlab.errors import ConfigError
from headlab.jobs.executors import SerialExecutor, make_executor
from headlab.parts import ModelSpec

#: the commands whose work splits into parts (estimate: its exact check)
PART_COMMANDS = ["sweep", "estimate", "prune", "cascade", "shift", "detect", "compare", "gate",
                 "l0", "steer", "attention"]  # fmt: skip
RAY_ARGS = ["--executor", "ray", "--ray-address", "auto", "--workers", "2", "--gpus-per-worker",
            "0.5"]  # fmt: skip


@pytest.mark.parametrize("command", PART_COMMANDS)
def test_every_part_splitting_command_takes_the_executor_options(command):
    args = build_parser().parse_args([command, "--out", "o", *RAY_ARGS])
    assert (args.executor, args.ray_address, args.workers, args.gpus_per_worker) == (
        "ray", "auto", 2, 0.5,
    )  # fmt: skip
    defaults = build_parser().parse_args([command, "--out", "o"])
    assert (defaults.executor, defaults.ray_address, defaults.workers) == ("serial", None, None)
    twin = inspect.signature(getattr(hl, f"run_{command}")).parameters
    assert {"executor", "ray_address", "workers", "gpus_per_worker"} <= set(twin)
    assert twin["executor"].default == "serial"


def test_serial_is_the_default_and_refuses_ray_options():
    assert isinstance(make_executor(), SerialExecutor)
    with pytest.raises(ConfigError, match="--workers and --gpus-per-worker need --executor ray"):
        make_executor("serial", workers=2)
    with pytest.raises(ConfigError, match="unknown executor 'dask'; choose from serial, ray"):
        make_executor("dask")
    with pytest.raises(ConfigError, match=r"go to RayExecutor\(...\)"):
        make_executor(SerialExecutor(), workers=2)


def test_ray_not_installed_names_the_extra(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails
    with pytest.raises(ConfigError, match=r"pip install 'headlab\[ray\]'"):
        make_executor("ray")
    argv = ["sweep", "--model", "no-such-model", "--out", str(tmp_path / "o"), "--executor", "ray"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--executor ray needs Ray, an optional extra: pip install 'headlab[ray]'" in err
    assert not (tmp_path / "o").exists()  # refused before loading or writing anything


def test_an_unreachable_ray_address_fails_within_seconds_naming_it(tmp_path, capsys):
    pytest.importorskip("ray")
    start = time.monotonic()
    unreachable = r"cannot reach the Ray cluster at --ray-address 127\.0\.0\.1:1 \("
    with pytest.raises(ConfigError, match=unreachable):
        make_executor("ray", ray_address="127.0.0.1:1")
    argv = ["prune", "--model", "no-such-model", "--out", str(tmp_path / "o"), "--executor", "ray",
            "--ray-address", "127.0.0.1:1"]  # fmt: skip
    assert main(argv) == 2
    assert time.monotonic() - start < 15
    assert "cannot reach the Ray cluster at --ray-address 127.0.0.1:1" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="'head-node' is not HOST:PORT"):
        make_executor("ray", ray_address="head-node")


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--workers", "0"], "--workers must be a positive integer, got 0"),
        (["--gpus-per-worker", "-1"], "--gpus-per-worker must be a number >= 0, got -1"),
    ],
)
def test_bad_counts_are_usage_errors(extra, message, tmp_path, capsys):
    argv = ["gate", "--model", "no-such-model", "--out", str(tmp_path / "o"), "--executor", "ray"]
    assert main([*argv, *extra]) == 2
    assert message in capsys.readouterr().err


def test_python_twins_check_the_executor_options_before_loading_anything(tmp_path):
    pytest.importorskip("ray")
    with pytest.raises(ConfigError, match="--workers must be a positive integer, got 0"):
        hl.run_sweep(out=tmp_path / "o", model="no-such-model", executor="ray", workers=0)
    with pytest.raises(ConfigError, match="--gpus-per-worker must be a number >= 0"):
        hl.run_l0(out=tmp_path / "o", model="no-such-model", executor="ray", gpus_per_worker=-1)
    assert not (tmp_path / "o").exists()


def test_a_model_spec_names_a_local_folder_by_its_absolute_path(tmp_path, monkeypatch):
    (tmp_path / "model").mkdir()
    monkeypatch.chdir(tmp_path)
    assert ModelSpec("model").portable().model == str(tmp_path / "model")
    assert ModelSpec("smollm2-135m").portable().model == "smollm2-135m"
    assert ModelSpec("org/not-here").portable().model == "org/not-here"
    inputs = hl.jobs.Inputs(model="m", dtype="bfloat16", device="cuda", allow_pickle=True)
    assert inputs.spec == ModelSpec("m", "bfloat16", "cuda", False, True)
    assert Path(ModelSpec("model").portable().model).is_absolute()
