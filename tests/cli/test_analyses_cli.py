"""`headlab prune / cascade / shift / detect` end to end on tiny local models."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from fixtures import ground_truth as gt

import headlab as hl
from headlab.analyses.detect import detect_heads
from headlab.analyses.prune import prune_plan, random_units
from headlab.cli.app import main
from headlab.models.load import load_model
from headlab.runs import RunDir

GT = str(gt.FOLDER)
TASK = ["--model", GT, "--task", "induction", "--n-blocks", "4", "--n-stats-blocks", "4"]


def docs(folder):
    return ["--model", folder, "--data", "python-docs", "--seq-len", "16", "--n-blocks", "3",
            "--n-stats-blocks", "4", "--batch-size", "2", "--quiet"]  # fmt: skip


def prune_args(folder, out, *extra):
    return ["prune", *docs(folder), "--fractions", "0,0.5,1", "--seeds", "0,1", "--bins", "50",
            "--method", "zero,peak", "--out", str(out), *extra]  # fmt: skip


@pytest.fixture(scope="module")
def pruned(tiny_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "prune"
    assert main(prune_args(tiny_folder, out)) == 0
    return out


def test_prune_cli_numbers_equal_direct_intervene(tiny_folder, pruned):
    table = pd.read_parquet(pruned / "results.parquet")
    assert set(table.order) == {"random", "sweep"} and len(table) == 2 * 3 * 3 * 2
    zero = table[table.fraction == 0]
    assert (zero.value == zero.baseline).all()
    model, _ = load_model(tiny_folder)
    batch = RunDir(pruned, {}).load_tokens()
    stats = hl.Stats.load(pruned / "stats.safetensors", model=model)
    layout = hl.describe(model)
    units = random_units(layout, "head", 1)[:6]  # 0.5 of 12 heads, seed 1
    plan = prune_plan(layout, "head", units, hl.Peak())
    want = hl.evaluate(model, batch, ["ce"], plan=plan, stats=stats)["ce"].mean
    row = table[(table.order == "random") & (table.seed == 1) & (table.method == "peak")]
    got = row[(row.fraction == 0.5) & (row.metric == "ce")]["value"].iloc[0]
    assert got == pytest.approx(want, rel=1e-5)
    # without --sweep only the first method is swept, and its ranking orders every method
    assert set(table[table.order == "sweep"].ranked_by) == {"sweep:zero/ce"}
    for name in ("summary.csv", "removable.csv", "prune.png"):
        assert (pruned / name).is_file()
    manifest = json.loads((pruned / "manifest.json").read_text())
    assert manifest["status"] == "complete" and "random/zero" in manifest["removable"]


def test_prune_cli_resumes_to_the_same_table(tiny_folder, pruned, tmp_path, monkeypatch):
    out = tmp_path / "again"
    argv = prune_args(tiny_folder, out, "--method", "zero", "--order", "random")
    real = RunDir.save_part
    calls = {"n": 0}

    def flaky(self, key, table):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        real(self, key, table)

    monkeypatch.setattr(RunDir, "save_part", flaky)
    assert main(argv) == 130
    assert json.loads((out / "manifest.json").read_text())["status"] == "interrupted"
    monkeypatch.setattr(RunDir, "save_part", real)
    assert main(argv) == 0
    got = pd.read_parquet(out / "results.parquet")
    full = pd.read_parquet(pruned / "results.parquet")
    want = full[(full.order == "random") & (full.method == "zero")].reset_index(drop=True)
    pd.testing.assert_frame_equal(got, want)  # the masks depend only on the seed


@pytest.fixture(scope="module")
def docs_sweep(tiny_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "sweep"
    assert main(["sweep", *docs(tiny_folder), "--method", "zero", "--out", str(out)]) == 0
    return out


SWEEP_ORDER = ("--order", "sweep", "--method", "zero,mean", "--seeds", "0")


def test_prune_cli_ranks_by_a_sweep_run(tiny_folder, docs_sweep, tmp_path):
    out = tmp_path / "p"
    assert main(prune_args(tiny_folder, out, *SWEEP_ORDER, "--sweep", str(docs_sweep))) == 0
    table = pd.read_parquet(out / "results.parquet")
    assert set(table.ranked_by) == {"sweep:zero/ce"}
    assert json.loads((out / "manifest.json").read_text())["sweep_on_same_blocks"] is True


def test_prune_cli_takes_held_out_blocks_but_not_other_data(
    tiny_folder, docs_sweep, tmp_path, capsys
):
    held_out = tmp_path / "h"
    argv = prune_args(tiny_folder, held_out, *SWEEP_ORDER, "--sweep", str(docs_sweep))
    assert main([*argv, "--seed", "3"]) == 0  # other blocks of the same corpus
    assert json.loads((held_out / "manifest.json").read_text())["sweep_on_same_blocks"] is False
    argv[argv.index("--seq-len") + 1] = "12"
    argv[argv.index("--out") + 1] = str(tmp_path / "q")
    assert main(argv) == 2
    assert "different data (seq_len: 16" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--fractions", "0.5,1.5"), "in [0, 1]"),
        (("--unit", "neuron", "--order", "sweep"), "use --unit head"),
        (("--tolerance", "-1"), "--tolerance must be >= 0"),
        (("--order", "magnitude"), "unknown pruning order"),
        (("--sweep", "/no/such/run"), "not a finished headlab sweep"),
    ],
)
def test_prune_cli_bad_input(tiny_folder, tmp_path, capsys, extra, message):
    assert main(prune_args(tiny_folder, tmp_path / "bad", "--method", "zero", *extra)) == 2
    assert message in capsys.readouterr().err


def test_prune_cli_tolerance_that_nothing_meets(tiny_folder, tmp_path, capsys):
    out = tmp_path / "tight"
    argv = prune_args(tiny_folder, out, "--method", "zero", "--order", "random", "--seeds", "0")
    argv += ["--tolerance", "0"]
    argv[argv.index("--fractions") + 1] = "0.5,1"
    assert main(argv) == 2
    assert "raise --tolerance" in capsys.readouterr().err
    assert (out / "results.parquet").is_file()  # the curves are kept


#: the options of docs() as keyword arguments of a Python twin
DOCS_KW = dict(data="python-docs", seq_len=16, n_blocks=3, n_stats_blocks=4, batch_size=2)


def same_run(a, b, tables):
    """The run directories ``a`` (Python twin) and ``b`` (CLI) hold the same run: same kind and
    identity (each resumes the other) and equal ``tables``."""
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    assert ma["status"] == mb["status"] == "complete"
    assert (ma["kind"], ma["identity"]) == (mb["kind"], mb["identity"])
    for name in tables:
        read = pd.read_parquet if name.endswith(".parquet") else pd.read_csv
        pd.testing.assert_frame_equal(read(a / name), read(b / name), check_exact=True)


def test_prune_python_twin_writes_the_same_run_as_the_cli(tiny_folder, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    result = hl.run_prune(
        out=a, model=tiny_folder, **DOCS_KW, methods=["zero", "peak"], fractions=[0, 0.5, 1],
        seeds=[0], bins=50,
    )  # fmt: skip
    assert main(prune_args(tiny_folder, b, "--seeds", "0")) == 0
    same_run(a, b, ["results.parquet", "summary.csv", "removable.csv"])
    pd.testing.assert_frame_equal(result.table, pd.read_parquet(b / "results.parquet"))
    assert set(result.table.order) == {"random", "sweep"} and (a / "prune.png").is_file()
    assert set(result.figures) == {"prune.png"} and result.same_blocks is True


def test_detect_cli_matches_the_analysis(tmp_path, capsys):
    out = tmp_path / "detect"
    argv = ["detect", "--model", GT, "--n-blocks", "4", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "induction_diag" in printed and "L1.H3" in printed
    table = pd.read_parquet(out / "results.parquet")
    model, _ = gt.load()
    want = detect_heads(model, RunDir(out, {}).load_tokens())
    pd.testing.assert_frame_equal(table, want)
    manifest = json.loads((out / "manifest.json").read_text())
    assert {tuple(h[:2]) for h in manifest["top_heads"]["induction"][:2]} == set(gt.INDUCTION)
    assert (out / "detect.png").is_file()
    assert main(argv) == 0  # resumes: nothing recomputed, same table
    pd.testing.assert_frame_equal(pd.read_parquet(out / "results.parquet"), want)
    bad = ["detect", "--model", GT, "--detector", "copying", "--out", str(tmp_path / "x")]
    assert main(bad) == 2
    assert "unknown detector 'copying'" in capsys.readouterr().err


def test_detect_python_twin_writes_the_same_run_directory(tmp_path):
    cli, twin = tmp_path / "cli", tmp_path / "twin"
    assert main(["detect", "--model", GT, "--n-blocks", "3", "--measure", "abs", "--exclude-bos",
                 "--top", "3", "--out", str(cli), "--quiet"]) == 0  # fmt: skip
    result = hl.run_detect(out=twin, model=GT, n_blocks=3, measure="abs", exclude_bos=True, top=3)
    table = pd.read_parquet(cli / "results.parquet")
    pd.testing.assert_frame_equal(pd.read_parquet(twin / "results.parquet"), table)
    pd.testing.assert_frame_equal(result.table, table)
    mine, theirs = (json.loads((d / "manifest.json").read_text()) for d in (twin, cli))
    assert mine["identity"] == theirs["identity"] and mine["top_heads"] == theirs["top_heads"]
    assert result.top_heads == theirs["top_heads"] and len(result.top_heads["induction"]) == 3
    assert (twin / "detect.png").is_file() and set(result.figures) == {"detect.png"}


def test_cascade_cli_flags_the_backup_induction_head(tmp_path, capsys):
    out = tmp_path / "cascade"
    heads = ",".join(f"1.{h}" for h in range(4))
    argv = ["cascade", *TASK, "--heads", heads, "--steps", "2", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    assert "backup: L1." in capsys.readouterr().out
    backups = pd.read_csv(out / "backups.csv")
    assert len(backups) == 1 and (1, int(backups["head"].iloc[0])) in gt.INDUCTION
    cost = pd.read_csv(out / "off_target.csv")
    assert set(cost.selected_on) == {"induction", "random"}
    assert {"induction", "python-docs"} <= set(cost.target)
    own = cost[(cost.selected_on == "induction") & (cost.target == "induction")]["effect"]
    ctrl = cost[(cost.selected_on == "random") & (cost.target == "induction")]["effect"]
    assert float(own.iloc[0]) > 3.0 > float(ctrl.iloc[0])
    assert (out / "cascade.png").is_file()


def test_shift_cli_ablates_the_top_heads_of_a_sweep(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    assert main(["sweep", *TASK, "--method", "zero", "--out", str(sweep), "--quiet"]) == 0
    out = tmp_path / "shift"
    argv = ["shift", *TASK, "--sweep", str(sweep), "--top-k", "2", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    assert "norm ratio" in capsys.readouterr().out
    table = pd.read_parquet(out / "results.parquet")
    assert set(table.method) == {"zero", "mean", "peak", "resample"}
    manifest = json.loads((out / "manifest.json").read_text())
    # the two heads without a backup (L1.H1's single effect is tiny: L1.H3 backs it up)
    assert {tuple(h) for h in manifest["heads"]} == {gt.PREVIOUS[0], (1, 3)}
    kl = table[table.metric == "kl"].set_index("method")["value"]
    assert (kl > 1.0).all()  # removing the circuit changes the predictions a lot
    assert (out / "shift.png").is_file()
    assert torch.isfinite(torch.tensor(table["value"].to_numpy())).all()


def test_cascade_cli_refuses_a_task_the_tokenizer_cannot_build(tmp_path, capsys):
    argv = ["cascade", *TASK, "--off-target", "names", "--out", str(tmp_path / "c"), "--quiet"]
    assert main(argv) == 2
    assert "names needs at least" in capsys.readouterr().err


@pytest.mark.slow
def test_detect_on_the_default_model(tmp_path):
    out = tmp_path / "detect"
    assert main(["detect", "--n-blocks", "2", "--quiet", "--out", str(out)]) == 0
    table = pd.read_parquet(out / "results.parquet").set_index(["metric", "layer", "head"])
    diag = table.sort_index().loc["induction_diag", "value"]
    assert (diag > 0.4).sum() >= 3  # SmolLM2 has several induction heads (L17-L18)
    assert 15 <= diag.idxmax()[0] <= 20 and diag.max() > 0.8
    assert table.sort_index().loc["previous_token", "value"].max() > 0.6


def test_cascade_off_target_keeps_its_own_blocks_apart_from_the_same_corpus(tiny_folder, tmp_path):
    out = tmp_path / "c"
    argv = ["cascade", *docs(tiny_folder), "--steps", "1", "--heads", "0.0,0.1,1.0",
            "--off-target", "python-docs", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    cost = pd.read_csv(out / "off_target.csv")
    mine = cost[cost.selected_on == "python-docs"].set_index("target")
    assert set(mine.index) == {"python-docs (eval blocks)", "python-docs"}
    # the eval-blocks row is the cascade's own measurement: its baseline is the clean metric
    clean = pd.read_parquet(out / "results.parquet")["clean"].iloc[0]
    assert mine.loc["python-docs (eval blocks)", "baseline"] == pytest.approx(clean, rel=1e-6)
    assert mine.loc["python-docs", "baseline"] != pytest.approx(clean, rel=1e-6)


def test_cascade_python_twin_writes_the_same_run_as_the_cli(tiny_folder, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    heads = [(0, 0), (0, 1), (1, 0), (1, 2)]
    result = hl.run_cascade(
        out=a, model=tiny_folder, **DOCS_KW, method="mean", steps=2, heads=heads,
        off_target="python-docs", bins=50,
    )  # fmt: skip
    argv = ["cascade", *docs(tiny_folder), "--method", "mean", "--steps", "2", "--heads",
            "0.0,0.1,1.0,1.2", "--off-target", "python-docs", "--bins", "50",
            "--out", str(b)]  # fmt: skip
    assert main(argv) == 0
    same_run(a, b, ["results.parquet", "backups.csv", "off_target.csv"])
    pd.testing.assert_frame_equal(result.table, pd.read_parquet(b / "results.parquet"))
    removed = json.loads((b / "manifest.json").read_text())["removed"]
    assert result.removed == [tuple(h) for h in removed] and len(removed) == 2
    assert set(result.off_target.target) == {"python-docs (eval blocks)", "python-docs"}
    assert (a / "stats.safetensors").is_file() and (a / "cascade.png").is_file()


def test_shift_python_twin_writes_the_same_run_as_the_cli(tiny_folder, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    result = hl.run_shift(
        out=a, model=tiny_folder, **DOCS_KW, methods=["zero", "peak"], top_k=2, each=True,
        bins=50,
    )  # fmt: skip
    argv = ["shift", *docs(tiny_folder), "--method", "zero,peak", "--top-k", "2", "--each",
            "--bins", "50", "--out", str(b)]  # fmt: skip
    assert main(argv) == 0
    same_run(a, b, ["results.parquet"])
    pd.testing.assert_frame_equal(result.table, pd.read_parquet(b / "results.parquet"))
    manifest = json.loads((b / "manifest.json").read_text())
    assert [list(h) for h in result.heads] == manifest["heads"] and len(result.heads) == 2
    assert set(result.table.target) == {"top2", *(f"L{ly}.H{h}" for ly, h in result.heads)}
