"""`headlab gate` and `headlab l0` end to end on a tiny local model: files, resume, bad input."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

import headlab as hl
from headlab.analyses.gates.chg import FITS
from headlab.cli.app import main
from headlab.errors import ConfigError

DATA = ["--task", "induction", "--seq-len", "17", "--n-blocks", "3", "--quiet"]
#: the Python twin's options equal to DATA
DATA_KW = dict(task="induction", seq_len=17, n_blocks=3)


def gate_args(folder, out, *extra):
    return [
        "gate",
        "--model",
        folder,
        *DATA,
        "--steps",
        "3",
        "--masks",
        "2",
        "--out",
        str(out),
        *extra,
    ]


def l0_args(folder, out, *extra):
    return [
        "l0",
        "--model",
        folder,
        *DATA,
        "--steps",
        "3",
        "--lam",
        "0,1",
        "--out",
        str(out),
        *extra,
    ]


@pytest.fixture(scope="module")
def gate_run(tiny_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("gate") / "run"
    assert main(gate_args(tiny_folder, out, "--validate", "--k", "2", "--random", "2")) == 0
    return out


def test_gate_writes_tables_figures_and_fits(gate_run, capsys):
    heads = pd.read_parquet(gate_run / "heads.parquet")
    assert len(heads) == 3 * 4
    assert list(heads.columns[:10]) == [
        "layer",
        "head",
        "g_zero",
        "g_plus",
        "g_minus",
        "facilitating",
        "interfering",
        "irrelevant",
        "label",
        "agreement",
    ]
    assert set(heads["label"]) <= {"facilitating", "interfering", "irrelevant", "unstable"}
    assert heads["facilitating"].tolist() == pytest.approx(heads["g_minus"].tolist())
    for fit in FITS:
        theta = load_file(str(gate_run / f"theta-{fit}.safetensors"))["value"]
        assert theta.shape == (2, 3, 4)  # [mask, layer, head]
        gates = torch.sigmoid(theta).mean(0).flatten().tolist()
        assert heads[f"g_{fit}"].tolist() == pytest.approx(gates, rel=1e-5)
    summary = pd.read_csv(gate_run / "summary.csv")
    assert set(summary["split"]) == {"fit", "heldout"}
    assert list(summary["gates"].unique()) == ["clean", *FITS]
    curves = pd.read_parquet(gate_run / "curves.parquet")
    assert len(curves) == 3 * 3 * 2  # fits x steps x masks
    val = pd.read_csv(gate_run / "validation.csv")
    assert {"facilitating", "random"} <= set(val["group"])
    fit, held = (val[val["split"] == sp].reset_index(drop=True) for sp in ("fit", "heldout"))
    assert len(fit) == len(held) and fit["heads"].tolist() == held["heads"].tolist()  # same sets
    assert held["baseline"].nunique() == 1 and held["baseline"][0] != fit["baseline"][0]
    assert (val["n_heads"] <= 2).all() and (val["delta"] == val["value"] - val["baseline"]).all()
    for name in ("gate_plus.png", "gate_minus.png", "labels.png", "loss_curves.png"):
        assert (gate_run / name).stat().st_size > 1000
    assert json.loads((gate_run / "manifest.json").read_text())["status"] == "complete"


def test_gate_resumes_after_the_last_finished_fit(tiny_folder, gate_run, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(gate_run, out)
    (out / "theta-minus.safetensors").unlink()
    (out / "parts" / "curve-minus.parquet").unlink()
    before = {f: (out / f"theta-{f}.safetensors").read_bytes() for f in ("zero", "plus")}
    assert main(gate_args(tiny_folder, out, "--validate", "--k", "2", "--random", "2")) == 0
    for fit, data in before.items():
        assert (out / f"theta-{fit}.safetensors").read_bytes() == data  # not refitted
    want = load_file(str(gate_run / "theta-minus.safetensors"))["value"]
    got = load_file(str(out / "theta-minus.safetensors"))["value"]
    torch.testing.assert_close(got, want)  # the refit is deterministic
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["resumed"] == 1 and manifest["status"] == "complete"


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--lam", "0"], "magnitude"),
        (["--lam", "-0.1"], "magnitude"),
        (["--lam", "1e6"], "too large"),
        (["--steps", "0"], "positive integer"),
        (["--forget-task", "induction"], "identical"),
    ],
)
def test_gate_bad_input(tiny_folder, tmp_path, capsys, extra, match):
    assert main(gate_args(tiny_folder, tmp_path / "bad", *extra)) == 2
    assert match in capsys.readouterr().err


def test_contrastive_gate(tiny_folder, tmp_path, capsys):
    out = tmp_path / "contrast"
    args = gate_args(
        tiny_folder, out, "--forget-data", "python-docs", "--validate", "--k", "2", "--random", "1"
    )
    assert main(args) == 0
    heads = pd.read_csv(out / "heads.csv")
    assert set(heads["role"]) <= {"forget-specific", "kept"}
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary["gates"]) == ["clean", "contrastive", "contrastive"]
    assert {"nll", "forget_nll", "loss"} <= set(summary.columns)
    val = pd.read_csv(out / "validation.csv")
    assert {"forget_score@retain", "forget_score@forget", "random@forget"} <= set(val["group"])
    assert (out / "gate_contrast.png").is_file() and "forget-specific" in capsys.readouterr().out


def test_l0_sweep_and_resume(tiny_folder, tmp_path, capsys):
    out = tmp_path / "l0"
    assert main(l0_args(tiny_folder, out)) == 0
    table = pd.read_csv(out / "tradeoff.csv")
    assert table["lam"].tolist() == [0.0, 1.0]
    heads = pd.read_parquet(out / "heads.parquet")
    assert len(heads) == 2 * 12
    assert (table["n_kept"] == heads.groupby("lam")["kept"].sum().to_numpy()).all()
    assert (out / "tradeoff.png").is_file() and (out / "loss_curves.png").is_file()
    saved = (out / "log_alpha-1.safetensors").read_bytes()
    assert main(l0_args(tiny_folder, out)) == 0
    assert (out / "log_alpha-1.safetensors").read_bytes() == saved
    assert json.loads((out / "manifest.json").read_text())["resumed"] == 1
    assert "heads kept" not in capsys.readouterr().err


@pytest.mark.parametrize(
    ("lams", "match"),
    [("-1", "negative"), ("1e9", "absurdly"), ("a,b", "numbers separated"), ("", "at least")],
)
def test_l0_bad_lambdas(tiny_folder, tmp_path, capsys, lams, match):
    assert main(l0_args(tiny_folder, tmp_path / "bad", "--lam", lams)) == 2
    assert match in capsys.readouterr().err


# --- the Python twins write the CLI's run directory ----------------------------------------------


def _same_tables(a, b, names):
    for name in names:
        read = pd.read_parquet if name.endswith(".parquet") else pd.read_csv
        pd.testing.assert_frame_equal(read(a / name), read(b / name), check_exact=True)


def test_run_gate_twin_writes_the_cli_run_directory(tiny_folder, tmp_path):
    """``hl.run_gate`` and ``headlab gate`` with the same options write the same tables, thetas
    and manifest identity (bit for bit: both run here, on the same threads)."""
    cli, py = tmp_path / "cli", tmp_path / "py"
    assert main(gate_args(tiny_folder, cli, "--validate", "--k", "2", "--random", "2")) == 0
    result = hl.run_gate(
        out=py, model=tiny_folder, **DATA_KW, steps=3, masks=2, validate=True, k=2, n_random=2
    )
    names = ["heads.parquet", "heads.csv", "summary.csv", "curves.parquet", "validation.csv"]
    _same_tables(py, cli, names)
    for fit in FITS:
        name = f"theta-{fit}.safetensors"
        assert (py / name).read_bytes() == (cli / name).read_bytes()
    pd.testing.assert_frame_equal(result.table, pd.read_parquet(cli / "heads.parquet"))
    assert result.mode == "chg" and result.run_dir.path == py
    assert set(result.figures) == {
        "gate_plus.png",
        "gate_minus.png",
        "labels.png",
        "loss_curves.png",
    }
    mine, theirs = (json.loads((d / "manifest.json").read_text()) for d in (py, cli))
    assert (mine["kind"], mine["identity"]) == (theirs["kind"], theirs["identity"])


def test_run_gate_contrastive_twin_writes_the_cli_run_directory(tiny_folder, tmp_path):
    extra = ["--forget-data", "python-docs", "--validate", "--k", "2", "--random", "1"]
    assert main(gate_args(tiny_folder, tmp_path / "cli", *extra)) == 0
    result = hl.run_gate(
        out=tmp_path / "py", model=tiny_folder, **DATA_KW, steps=3, masks=2,
        forget_data="python-docs", validate=True, k=2, n_random=1,
    )  # fmt: skip
    names = ["heads.parquet", "summary.csv", "parts/curve-contrast.parquet", "validation.csv"]
    _same_tables(tmp_path / "py", tmp_path / "cli", names)
    assert result.mode == "contrast"
    pd.testing.assert_frame_equal(result.summary, pd.read_csv(tmp_path / "cli" / "summary.csv"))


def test_run_l0_twin_writes_the_cli_run_directory(tiny_folder, tmp_path):
    assert main(l0_args(tiny_folder, tmp_path / "cli")) == 0
    result = hl.run_l0(out=tmp_path / "py", model=tiny_folder, **DATA_KW, steps=3, lams=[0, 1])
    names = ["tradeoff.parquet", "tradeoff.csv", "heads.parquet", "curves.parquet"]
    _same_tables(tmp_path / "py", tmp_path / "cli", names)
    pd.testing.assert_frame_equal(
        result.table, pd.read_parquet(tmp_path / "cli" / "tradeoff.parquet")
    )
    assert set(result.figures) == {"tradeoff.png", "loss_curves.png"}


@pytest.mark.parametrize("job", ["run_gate", "run_l0"])
def test_python_twins_check_the_batch_size_before_loading_anything(tmp_path, job):
    with pytest.raises(ConfigError, match="--batch-size must be a positive integer, got 0"):
        getattr(hl, job)(out=tmp_path / "o", model="no-such-model", batch_size=0)
    assert not (tmp_path / "o").exists()


def test_run_gate_refuses_two_forget_sets(tmp_path):
    with pytest.raises(ConfigError, match="either --forget-task or --forget-data"):
        hl.run_gate(out=tmp_path / "o", forget_task="names", forget_data="austen")
