"""`headlab sweep --top-k` end to end on a tiny local model: the answer is the full sweep's top k,
the run directory has the sweep's format plus intervals and statuses, an interrupted search
resumes to the same result (also on the other executor), and bad input gets a clear message."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import transformers as tf
from oracles import edited

import headlab as hl
from headlab.analyses.topk import SEARCH_COLUMNS
from headlab.cli.app import main
from headlab.runs import RunDir, read_manifest

DATA = ["--data", "python-docs", "--seq-len", "16", "--n-blocks", "32", "--n-stats-blocks", "4"]
TWIN = dict(data="python-docs", seq_len=16, n_blocks=32, n_stats_blocks=4, methods=["zero", "mean"])


@pytest.fixture(scope="module")
def skewed(tiny_folder, tmp_path_factory):
    """The tiny Llama with heads that matter very unequally, as in trained models (every head's
    output projection scaled by 0.02 except three), saved as a model folder."""
    out = tmp_path_factory.mktemp("skewed") / "model"
    model = tf.AutoModelForCausalLM.from_pretrained(tiny_folder)
    lay = hl.describe(model)
    edits = [(ly, h, "scale", 0.02) for ly in range(lay.n_layers) for h in range(lay.n_heads)]
    edits[1], edits[6], edits[-1] = (0, 1, "scale", 3.0), (1, 2, "scale", 1.0), (2, 3, "scale", 2.0)
    edited(model, edits).save_pretrained(out)
    for f in Path(tiny_folder).iterdir():
        if "token" in f.name:
            shutil.copy(f, out / f.name)
    return str(out)


def args(folder, out, *extra):
    return ["sweep", "--model", folder, *DATA, "--method", "zero,mean", "--quiet", "--out",
            str(out), *extra]  # fmt: skip


@pytest.fixture(scope="module")
def full(skewed, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "sweep"
    assert main(args(skewed, out)) == 0
    return pd.read_parquet(out / "results.parquet")


@pytest.fixture(scope="module")
def searched(skewed, tmp_path_factory):
    out = tmp_path_factory.mktemp("topk") / "run"
    assert main(args(skewed, out, "--top-k", "3")) == 0
    return out


def _top(table: pd.DataFrame, k: int) -> dict[str, set[tuple[int, int]]]:
    out = {}
    for method, g in table.groupby("method"):
        g = g.assign(key=g["delta"].abs()).sort_values("key", ascending=False, kind="stable")
        out[method] = {(int(r.layer), int(r.head)) for r in g.head(k).itertuples()}
    return out


def test_search_finds_the_full_sweeps_top_k_at_less_cost(searched, full):
    table = pd.read_parquet(searched / "results.parquet")
    assert list(table.columns) == SEARCH_COLUMNS
    assert len(table) == len(full) == 2 * 12  # every head of every method, like the sweep
    assert _top(table[table.in_top_k], 3) == _top(full, 3)
    both = full.merge(table, on=["layer", "head", "method", "metric"], suffixes=("", "_k"))
    exact = both[both.n_k == 32]
    assert len(exact) >= 6
    np.testing.assert_allclose(exact["delta_k"], exact["delta"], atol=1e-6, rtol=0)
    stopped = both[both.n_k < 32]
    assert len(stopped) >= 6 and set(stopped.status) == {"eliminated"}
    assert ((stopped.lo <= stopped.delta) & (stopped.delta <= stopped.hi)).all()
    manifest = read_manifest(searched)
    assert manifest["kind"] == "sweep-topk" and manifest["status"] == "complete"
    info = manifest["top_k"]
    assert info["rule"]["k"] == 3 and info["rule"]["confidence"] == 0.95
    assert info["rule"]["direction"] == "abs"
    assert info["cost"]["search_tokens"] < info["cost"]["sweep_tokens"] == (2 * 12 + 1) * 32 * 16
    for key in ("zero/ce", "mean/ce"):
        assert info["summary"][key]["guaranteed"] and len(info["summary"][key]["top"]) == 3
    ranking = pd.read_csv(searched / "ranking.csv")
    assert ranking.groupby("method").head(3)["in_top_k"].all()
    assert {p.name for p in searched.glob("*.png")} == {
        "heatmap_zero_ce.png",
        "heatmap_mean_ce.png",
    }


def test_cli_prints_the_heads_their_intervals_and_the_cost(skewed, tmp_path, capsys):
    assert main(args(skewed, tmp_path / "run", "--top-k", "2", "--method", "zero")) == 0
    out = capsys.readouterr().out
    assert "top 2 heads by |Δ|" in out and "exact" in out and "% of the full sweep's" in out


def test_python_twin_writes_the_cli_run_directory(skewed, searched, tmp_path):
    out = tmp_path / "twin"
    result = hl.run_sweep(out=out, model=skewed, top_k=3, **TWIN)
    pd.testing.assert_frame_equal(
        result.table, pd.read_parquet(searched / "results.parquet"), check_exact=True
    )
    assert result.search["cost"] == read_manifest(searched)["top_k"]["cost"]
    assert read_manifest(out)["identity"] == read_manifest(searched)["identity"]


def _interrupt_after(monkeypatch, n: int) -> list[str]:
    real, saved = RunDir.save_part, []

    def flaky(self, key, table):
        if len(saved) == n:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the search
        saved.append(key)
        real(self, key, table)

    monkeypatch.setattr(RunDir, "save_part", flaky)
    return saved


def test_interrupted_search_resumes_to_the_same_result(skewed, searched, tmp_path, monkeypatch):
    out = tmp_path / "resumed"
    with monkeypatch.context() as mp:
        saved = _interrupt_after(mp, 8)  # the clean part, round 0, some of round 1
        assert main(args(skewed, out, "--top-k", "3")) == 130
    assert read_manifest(out)["status"] == "interrupted" and len(saved) == 8
    assert main(args(skewed, out, "--top-k", "3")) == 0
    for name in ("results.parquet", "ranking.csv"):
        read = pd.read_csv if name.endswith(".csv") else pd.read_parquet
        pd.testing.assert_frame_equal(read(out / name), read(searched / name), check_exact=True)
    assert {p.name for p in (out / "parts").iterdir()} == {
        p.name for p in (searched / "parts").iterdir()
    }
    assert read_manifest(out)["resumed"] == 1


def test_a_search_interrupted_in_this_process_resumes_on_ray(
    skewed, searched, tmp_path, monkeypatch, ray_cluster
):
    out = tmp_path / "ray"
    with monkeypatch.context() as mp:
        _interrupt_after(mp, 8)
        with pytest.raises(KeyboardInterrupt):
            hl.run_sweep(out=out, model=skewed, top_k=3, **TWIN)
    hl.run_sweep(out=out, model=skewed, top_k=3, executor="ray", workers=1, **TWIN)
    pd.testing.assert_frame_equal(
        pd.read_parquet(out / "results.parquet"),
        pd.read_parquet(searched / "results.parquet"),
        check_exact=True,
    )


def test_a_search_and_a_full_sweep_never_share_a_run_directory(skewed, searched, capsys):
    assert main(args(skewed, searched)) == 2  # the full sweep into the search's directory
    assert "holds a different sweep-topk run" in capsys.readouterr().err
    assert main(args(skewed, searched, "--top-k", "2")) == 2  # another K: another run
    assert "top_k" in capsys.readouterr().err


def test_a_spent_budget_names_the_undecided_heads_and_what_would_decide_them(
    skewed, tmp_path, capsys
):
    out = tmp_path / "budget"
    assert main(args(skewed, out, "--top-k", "3", "--method", "zero", "--max-cost", "0.2")) == 0
    printed = capsys.readouterr().out
    assert "NOT decided" in printed and "undecided: L" in printed and "would decide it" in printed
    table = pd.read_parquet(out / "results.parquet")
    und = table[table.status == "undecided"]
    assert len(und) and (und.n_needed > und.n).all() and table.in_top_k.sum() == 3
    summary = read_manifest(out)["top_k"]["summary"]["zero/ce"]
    assert not summary["guaranteed"] and len(summary["undecided"]) == len(und)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--top-k", "0"], "--top-k must be a positive integer"),
        (["--top-k", "2", "--confidence", "1.5"], "strictly between 0 and 1"),
        (["--top-k", "2", "--confidence", "0"], "strictly between 0 and 1"),
        (["--top-k", "2", "--direction", "up"], "invalid choice: 'up'"),
        (["--top-k", "2", "--max-cost", "2"], "--max-cost must be a fraction in (0, 1]"),
        (["--top-k", "13"], "--top-k 13 asks for more heads than the 12 being swept"),
        (["--top-k", "2", "--n-blocks", "4"], "too few examples to decide anything"),
    ],
)
def test_bad_input_gets_a_clear_message(skewed, tmp_path, capsys, extra, message):
    assert main(args(skewed, tmp_path / "bad", *extra)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "bad" / "manifest.json").exists()


def test_manifest_of_a_finished_search_is_valid_json(searched):
    assert json.loads((searched / "manifest.json").read_text())["top_k"]["rule"]["k"] == 3
