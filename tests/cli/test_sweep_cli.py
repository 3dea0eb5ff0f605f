"""`headlab sweep` end to end on a tiny local model: numbers, resume, refusal, bad input."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

import headlab as hl
from headlab.cli.app import main
from headlab.interventions import intervention_from_name
from headlab.models.load import load_model
from headlab.runs import RunDir

METHODS = "zero,mean,peak,median,resample,scale:-1"


def args(folder, out, *extra):
    return [
        "sweep",
        "--model",
        folder,
        "--data",
        "python-docs",
        "--seq-len",
        "16",
        "--n-blocks",
        "3",
        "--n-stats-blocks",
        "4",
        "--method",
        METHODS,
        "--metric",
        "ce,top1,kl",
        "--out",
        str(out),
        "--quiet",
        "--batch-size",
        "2",
        *extra,
    ]


@pytest.fixture(scope="module")
def finished(tiny_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "full"
    assert main(args(tiny_folder, out)) == 0
    return out


def test_table_numbers_equal_direct_intervene_calls(tiny_folder, finished):
    table = pd.read_parquet(finished / "results.parquet")
    assert len(table) == 6 * 12 * 3  # methods x heads x metrics
    assert list(table.columns[:7]) == [
        "layer",
        "head",
        "method",
        "metric",
        "value",
        "baseline",
        "delta",
    ]
    model, _ = load_model(tiny_folder)
    run = RunDir(finished, {})
    batch = run.load_tokens()
    stats = hl.Stats.load(finished / "stats.safetensors", model=model)
    clean = hl.evaluate(model, batch, ["ce", "top1"])
    for method in METHODS.split(","):
        for layer, head in [(0, 1), (2, 3)]:
            plan = hl.Plan.of({(layer, head): intervention_from_name(method)})
            with hl.intervene(model, plan, stats=stats), torch.no_grad():
                logits = model(input_ids=batch.input_ids).logits
            with torch.no_grad():
                clean_logits = model(input_ids=batch.input_ids).logits
            ce = hl.get_metric("ce")(logits, batch).mean
            kl = hl.get_metric("kl")(logits, batch, clean_logits).mean
            row = table[(table.method == method) & (table.layer == layer) & (table["head"] == head)]
            got = row.set_index("metric")
            assert got.loc["ce", "value"] == pytest.approx(ce, rel=1e-5)
            assert got.loc["ce", "baseline"] == pytest.approx(clean["ce"].mean, rel=1e-6)
            assert got.loc["ce", "delta"] == pytest.approx(ce - clean["ce"].mean, abs=1e-5)
            assert got.loc["kl", "value"] == pytest.approx(kl, rel=1e-4, abs=1e-7)
    ranking = pd.read_csv(finished / "ranking.csv")
    zero_ce = ranking[(ranking.method == "zero") & (ranking.metric == "ce")]
    assert zero_ce["effect"].is_monotonic_decreasing and zero_ce["rank"].tolist()[0] == 1
    manifest = json.loads((finished / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["identity"]["methods"] == METHODS.split(",")
    assert {"torch", "transformers", "headlab"} <= set(manifest["versions"])
    pngs = sorted(p.name for p in finished.glob("heatmap_*.png"))
    assert len(pngs) == 18 and "heatmap_scale_-1_kl.png" in pngs


def test_interrupted_run_resumes_to_the_same_table(tiny_folder, finished, tmp_path, monkeypatch):
    out = tmp_path / "resumed"
    real = RunDir.save_part
    calls = {"n": 0}

    def flaky(self, key, table):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the sweep
        real(self, key, table)

    monkeypatch.setattr(RunDir, "save_part", flaky)
    assert main(args(tiny_folder, out)) == 130
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "interrupted"
    assert len(list((out / "parts").glob("*.parquet"))) == 4
    monkeypatch.setattr(RunDir, "save_part", real)
    assert main(args(tiny_folder, out)) == 0
    a = pd.read_parquet(out / "results.parquet")
    b = pd.read_parquet(finished / "results.parquet")
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    assert json.loads((out / "manifest.json").read_text())["resumed"] == 1


def test_killed_run_with_a_half_written_part_resumes(tiny_folder, finished, tmp_path):
    out = tmp_path / "killed"
    assert main(args(tiny_folder, out)) == 0
    # simulate a kill: status still 'running', two parts lost, a stray temporary file left
    parts = sorted((out / "parts").glob("*.parquet"))
    for p in parts[3:5]:
        p.unlink()
    (out / "parts" / ".zero-L001.tmp").write_bytes(b"garbage")
    (out / "results.parquet").unlink()
    m = json.loads((out / "manifest.json").read_text())
    m["status"] = "running"
    (out / "manifest.json").write_text(json.dumps(m))
    assert main(args(tiny_folder, out)) == 0
    pd.testing.assert_frame_equal(
        pd.read_parquet(out / "results.parquet"),
        pd.read_parquet(finished / "results.parquet"),
        check_exact=True,
    )


def test_directory_of_another_run_is_refused_unless_force(tiny_folder, finished, tmp_path, capsys):
    out = tmp_path / "other"
    assert main(args(tiny_folder, out)) == 0
    other = args(tiny_folder, out)
    other[other.index("--method") + 1] = "zero"
    assert main(other) == 2
    err = capsys.readouterr().err
    assert "holds a different sweep run" in err and "--force" in err
    assert main([*other, "--force"]) == 0
    assert set(pd.read_parquet(out / "results.parquet").method) == {"zero"}
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "notes.txt").write_text("mine")
    assert main(args(tiny_folder, stray)) == 2
    assert "not an empty headlab run directory" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("--method", "zero,bogus"), "unknown method 'bogus'"),
        (("--data", "no-such-corpus"), "python-docs"),
        (("--seq-len", "1000"), "model maximum of 128"),
        (("--metric", "bleu"), "unknown metric 'bleu'"),
        (("--n-blocks", "100000"), "ask for fewer blocks"),
    ],
)
def test_bad_input_gets_a_clear_message(tiny_folder, tmp_path, capsys, change, message):
    argv = args(tiny_folder, tmp_path / "bad")
    argv[argv.index(change[0]) + 1] = change[1]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_unknown_task_and_missing_model(tiny_folder, tmp_path, capsys):
    assert (
        main(
            [
                "sweep",
                "--model",
                tiny_folder,
                "--task",
                "nope",
                "--out",
                str(tmp_path / "t"),
                "--quiet",
            ]
        )
        == 2
    )
    assert "induction" in capsys.readouterr().err
    assert (
        main(
            [
                "sweep",
                "--model",
                str(tmp_path / "missing-folder"),
                "--out",
                str(tmp_path / "m"),
                "--quiet",
            ]
        )
        == 2
    )
    assert "folder" in capsys.readouterr().err


def test_unreadable_or_empty_corpus_files(tiny_folder, tmp_path, capsys):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait ".encode("latin-1") * 50)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    for path, message in [(bad, "UTF-8"), (empty, "empty")]:
        argv = args(tiny_folder, tmp_path / f"out-{path.stem}")
        argv[argv.index("--data") + 1] = str(path)
        assert main(argv) == 2
        assert message in capsys.readouterr().err


def test_run_sweep_twin_writes_the_cli_run_directory(tiny_folder, tmp_path):
    """``hl.run_sweep`` and ``headlab sweep`` with the same options write the same tables."""
    opts = dict(data="python-docs", seq_len=16, n_blocks=2, n_stats_blocks=2, batch_size=2)
    result = hl.run_sweep(out=tmp_path / "py", model=str(tiny_folder), methods=["zero", "mean"],
                          bins=50, reservoir=2, **opts)  # fmt: skip
    argv = [
        "sweep", "--model", str(tiny_folder), "--data", "python-docs", "--seq-len", "16",
        "--n-blocks", "2", "--n-stats-blocks", "2", "--batch-size", "2", "--method", "zero,mean",
        "--bins", "50", "--reservoir", "2", "--out", str(tmp_path / "cli"), "--quiet",
    ]  # fmt: skip
    assert main(argv) == 0
    for name in ("results.parquet", "ranking.csv"):
        read = pd.read_parquet if name.endswith(".parquet") else pd.read_csv
        pd.testing.assert_frame_equal(read(tmp_path / "py" / name), read(tmp_path / "cli" / name))
    pd.testing.assert_frame_equal(
        result.table, pd.read_parquet(tmp_path / "cli" / "results.parquet")
    )


def test_zero_only_sweep_collects_no_statistics(tiny_folder, tmp_path):
    """Statistics are collected only when a method reads them."""
    argv = [
        "sweep", "--model", str(tiny_folder), "--data", "python-docs", "--seq-len", "16",
        "--n-blocks", "2", "--n-stats-blocks", "2", "--method", "zero,scale:2",
        "--out", str(tmp_path / "z"), "--quiet",
    ]  # fmt: skip
    assert main(argv) == 0
    assert not (tmp_path / "z" / "stats.safetensors").exists()
    assert len(pd.read_parquet(tmp_path / "z" / "results.parquet")) > 0
