"""`headlab compare` end to end on a tiny local model: numbers equal the Python API on the saved
tokens, resumption, reuse of a sweep's per-example data, off-target table, bad input."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import headlab as hl
from headlab.analyses.compare import compare
from headlab.cli.app import main
from headlab.models.load import load_model
from headlab.runs import RunDir


def docs(folder, *extra):
    return ["--model", folder, "--data", "python-docs", "--seq-len", "16", "--n-blocks", "3",
            "--n-stats-blocks", "4", "--batch-size", "2", "--bins", "50", "--quiet",
            *extra]  # fmt: skip


def compare_args(folder, out, *extra):
    return ["compare", *docs(folder), "--top-k", "3", "--bootstrap", "200", "--out", str(out),
            *extra]  # fmt: skip


@pytest.fixture(scope="module")
def compared(tiny_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "compare"
    assert main(compare_args(tiny_folder, out)) == 0
    return out


def test_compare_cli_numbers_equal_the_api_on_the_saved_tokens(tiny_folder, compared, capsys):
    model, _ = load_model(tiny_folder)
    run = RunDir(compared, {})
    batch = run.load_tokens()
    stats = hl.Stats.load(compared / "stats.safetensors", model=model)
    want = compare(model, batch, methods=["zero", "mean"], stats=stats, n_boot=200, k=3)
    got = pd.read_csv(compared / "agreement.csv")
    assert list(got["measure"]) == ["ablation:mean", "atp:zero", "atp:mean", "gradient",
                                    "rollout", "attention"]  # fmt: skip
    pd.testing.assert_frame_equal(got, want.agreement, check_exact=False, rtol=1e-6)
    scores = pd.read_parquet(compared / "scores.parquet")
    pd.testing.assert_frame_equal(scores, want.scores, check_exact=False, rtol=1e-6)
    sweep = hl.sweep(model, batch, methods=["zero"])
    zero = scores[scores.measure == "ablation:zero"]
    assert zero["value"].to_numpy() == pytest.approx(sweep["delta"].abs().to_numpy(), rel=1e-9)
    assert len(pd.read_csv(compared / "pairs.csv")) == 7 * 7
    assert len(pd.read_parquet(compared / "per_example.parquet")) == 7 * 3 * 12
    assert (compared / "compare.png").is_file()
    manifest = json.loads((compared / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["reference"] == "ablation:zero"
    assert set(manifest["agreement"]) == set(got["measure"])


def test_compare_cli_resumes_to_the_same_tables(tiny_folder, compared, tmp_path, monkeypatch):
    out = tmp_path / "again"
    argv = compare_args(tiny_folder, out)
    real = RunDir.save_part
    calls = {"n": 0}

    def flaky(self, key, table):
        calls["n"] += 1
        if calls["n"] == 6:  # after the cheap measures and one exact layer
            raise KeyboardInterrupt
        real(self, key, table)

    monkeypatch.setattr(RunDir, "save_part", flaky)
    assert main(argv) == 130
    assert json.loads((out / "manifest.json").read_text())["status"] == "interrupted"
    assert len(list((out / "parts").glob("*.parquet"))) == 5
    monkeypatch.setattr(RunDir, "save_part", real)
    assert main(argv) == 0
    for name in ("agreement.csv", "pairs.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(out / name), pd.read_csv(compared / name))
    pd.testing.assert_frame_equal(
        pd.read_parquet(out / "scores.parquet"), pd.read_parquet(compared / "scores.parquet")
    )


@pytest.fixture(scope="module")
def swept(tiny_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "sweep"
    argv = ["sweep", *docs(tiny_folder), "--method", "zero", "--out", str(out)]
    assert main(argv) == 0
    return out


def test_compare_cli_reuses_a_sweeps_per_example_data_only(tiny_folder, compared, swept, tmp_path):
    # no per-example data in a plain sweep: recomputed, same numbers
    out = tmp_path / "plain"
    assert main(compare_args(tiny_folder, out, "--methods", "zero", "--measures", "atp",
                             "--sweep", str(swept))) == 0  # fmt: skip
    plain = pd.read_parquet(out / "scores.parquet")
    full = pd.read_parquet(compared / "scores.parquet")
    pd.testing.assert_frame_equal(
        plain[plain.measure == "ablation:zero"].reset_index(drop=True),
        full[full.measure == "ablation:zero"].reset_index(drop=True),
    )
    # with per-example data on the same blocks, it is read instead of measured
    per = pd.read_parquet(compared / "per_example.parquet")
    per = per[per.measure == "ablation:zero"].copy()
    per["value"] = per["value"] * 0 + (per["layer"] * 10 + per["head"]) * 1e-3  # planted
    per.to_parquet(swept / "per_example.parquet")
    try:
        out = tmp_path / "reused"
        assert main(compare_args(tiny_folder, out, "--methods", "zero", "--measures", "atp",
                                 "--sweep", str(swept))) == 0  # fmt: skip
    finally:
        (swept / "per_example.parquet").unlink()
    got = pd.read_parquet(out / "scores.parquet")
    zero = got[got.measure == "ablation:zero"]
    assert zero["value"].to_numpy() == pytest.approx((zero.layer * 10 + zero["head"]) * 1e-3)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--sweep", "nowhere"), "not a finished headlab sweep run directory"),
        (("--top-k", "0"), "--top-k must be a positive integer, got 0"),
        (("--bootstrap", "-1"), "--bootstrap must be a non-negative integer, got -1"),
        (("--measures", "atp,shap"), "unknown measure 'shap'"),
        (("--reference", "rollout", "--measures", "atp"), "--reference rollout is not one"),
        (("--metric", "top1"), "'top1' has no gradient"),
    ],
)
def test_compare_cli_refuses_bad_input(tiny_folder, tmp_path, capsys, extra, message):
    assert main(compare_args(tiny_folder, tmp_path / "x", *extra)) == 2
    assert message in capsys.readouterr().err


def test_compare_cli_refuses_a_sweep_of_other_data_or_model(tiny_folder, swept, tmp_path, capsys):
    argv = compare_args(tiny_folder, tmp_path / "a", "--sweep", str(swept))
    argv[argv.index("--seq-len") + 1] = "12"
    assert main(argv) == 2
    assert "different data (seq_len: 16" in capsys.readouterr().err
    from fixtures import ground_truth as gt

    argv = ["compare", "--model", str(gt.FOLDER), "--task", "induction", "--n-blocks", "2",
            "--n-stats-blocks", "2", "--quiet", "--sweep", str(swept), "--out",
            str(tmp_path / "b")]  # fmt: skip
    assert main(argv) == 2
    assert "was run on a different model" in capsys.readouterr().err


def test_compare_cli_off_target_table_equals_direct_ablation(tiny_folder, compared, tmp_path):
    out = tmp_path / "off"
    argv = compare_args(tiny_folder, out, "--methods", "zero", "--measures", "atp,rollout",
                        "--off-target", "python-docs")  # fmt: skip
    assert main(argv) == 0
    cost = pd.read_csv(out / "off_target.csv")
    assert list(cost.selected_by.unique()) == ["ablation:zero", "atp:zero", "rollout", "random"]
    assert set(cost.target) == {"python-docs (eval blocks)", "python-docs"}
    model, _ = load_model(tiny_folder)
    batch = RunDir(out, {}).load_tokens()
    scores = pd.read_parquet(out / "scores.parquet")
    top = scores[scores.measure == "atp:zero"].sort_values(["rank", "layer", "head"]).head(3)
    plan = hl.Plan.heads(list(zip(top.layer, top["head"], strict=True)), hl.Zero())
    want = hl.evaluate(model, batch, ["ce"], plan=plan)["ce"].mean
    row = cost[(cost.selected_by == "atp:zero") & (cost.target == "python-docs (eval blocks)")]
    assert row["value"].iloc[0] == pytest.approx(want, rel=1e-6)
    assert (cost["n_heads"] == 3).all() and np.isfinite(cost["effect"]).all()


def test_run_compare_writes_what_the_cli_writes(tiny_folder, compared, tmp_path):
    out = tmp_path / "twin"
    result = hl.run_compare(
        out=out, model=tiny_folder, data="python-docs", seq_len=16, n_blocks=3,
        n_stats_blocks=4, batch_size=2, bins=50, top_k=3, bootstrap=200,
    )  # fmt: skip
    assert result.run_dir.path == out and result.reference == "ablation:zero"
    assert set(result.figures) == {"compare.png", "recall_cost.png"} and result.off_target is None
    for name in ("per_example.parquet", "scores.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(out / name), pd.read_parquet(compared / name))
    for name in ("agreement.csv", "pairs.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(out / name), pd.read_csv(compared / name))
    pd.testing.assert_frame_equal(result.scores, pd.read_parquet(compared / "scores.parquet"))
    assert sorted(p.name for p in (out / "parts").iterdir()) == sorted(
        p.name for p in (compared / "parts").iterdir()
    )
    mine, theirs = (json.loads((d / "manifest.json").read_text()) for d in (out, compared))
    assert mine["kind"] == theirs["kind"] == "compare"
    assert mine["identity"] == theirs["identity"]
