"""`headlab attention` end to end on the ground-truth model: files, numbers equal to the Python
API and direct interventions, resumption after an interrupt, and clear errors."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from fixtures import ground_truth as gt

import headlab as hl
from headlab.analyses.attention import attention_mass, causal_effects, compare_rankings
from headlab.cli.app import main
from headlab.runs import RunDir

GT = str(gt.FOLDER)
PROMPT = "t3 t5 t7 t9 t3 t5 t7"


def args(out, *extra):
    return ["attention", "--model", GT, "--task", "induction", "--n-blocks", "6",
            "--n-stats-blocks", "6", "--n-boot", "100", "--top-k", "3", "--quiet",
            "--out", str(out), *extra]  # fmt: skip


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    out = tmp_path_factory.mktemp("att") / "run"
    assert main(args(out, "--prompt", PROMPT, "--heads", "1.1,0.2")) == 0
    return out


def test_cli_writes_patterns_and_the_comparison(done, capsys):
    for name in ("patterns.parquet", "rollout.parquet", "attention_grid.png", "rollout.png",
                 "head_L1_H1.png", "head_L0_H2.png", "results.parquet", "summary.csv",
                 "faithfulness.png", "prompt_tokens.safetensors"):  # fmt: skip
        assert (done / name).is_file(), name
    patterns = pd.read_parquet(done / "patterns.parquet")
    model, tok = gt.load()
    ids = torch.tensor([tok(PROMPT)["input_ids"]])
    model.set_attn_implementation("eager")
    with torch.no_grad():
        att = model(input_ids=ids, output_attentions=True).attentions
    model.set_attn_implementation("sdpa")
    row = patterns[(patterns.layer == 1) & (patterns["head"] == 3)].set_index(["query", "key"])
    assert row.loc[(7, 4), "weight"] == pytest.approx(float(att[1][0, 3, 7, 4]), abs=1e-6)
    assert row.loc[(7, 4), "key_token"] == "t9"
    manifest = json.loads((done / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["summary"]["keys"] == "induction"


def test_cli_numbers_equal_the_python_api(done):
    model, _ = gt.load()
    batch = RunDir(done, {}).load_tokens()
    mass = attention_mass(model, batch)
    effects = causal_effects(model, batch, method="zero", metric="ce")
    want, summary = compare_rankings(mass, effects, n_boot=100, top_k=3)
    got = pd.read_parquet(done / "results.parquet")
    pd.testing.assert_frame_equal(got, want, check_exact=False, rtol=1e-6)
    saved = pd.read_csv(done / "summary.csv").iloc[0]
    assert saved.spearman == pytest.approx(summary.iloc[0].spearman)
    assert saved.ci_low == pytest.approx(summary.iloc[0].ci_low)
    # the causal column is exact: zero-ablate head 1.3 directly
    plan = hl.Plan.of({(1, 3): hl.Zero()})
    delta = hl.evaluate(model, batch, ["ce"], plan=plan)["ce"].mean
    delta -= hl.evaluate(model, batch, ["ce"])["ce"].mean
    assert got.set_index(["layer", "head"]).loc[(1, 3), "effect"] == pytest.approx(delta, rel=1e-5)


def test_python_twin_writes_the_same_run_directory(done, tmp_path):
    out = tmp_path / "twin"
    result = hl.run_attention(
        out=out, model=GT, task="induction", n_blocks=6, n_stats_blocks=6, n_boot=100, top_k=3,
        prompt=PROMPT, heads=[(1, 1), (0, 2)],
    )  # fmt: skip
    for name in ("results.parquet", "patterns.parquet", "rollout.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(out / name), pd.read_parquet(done / name))
    summary = pd.read_csv(out / "summary.csv")
    pd.testing.assert_frame_equal(summary, pd.read_csv(done / "summary.csv"))
    pd.testing.assert_frame_equal(result.table, pd.read_parquet(done / "results.parquet"))
    mine, theirs = (json.loads((d / "manifest.json").read_text()) for d in (out, done))
    assert mine["identity"] == theirs["identity"] and mine["summary"] == theirs["summary"]
    assert sorted(result.figures) == sorted(
        ["attention_grid.png", "rollout.png", "head_L1_H1.png", "head_L0_H2.png",
         "faithfulness.png"]
    )  # fmt: skip
    assert result.run_dir.path == out and result.prompt.seq_len == 8


def test_cli_resumes_after_an_interrupt(done, tmp_path, monkeypatch):
    out = tmp_path / "again"
    real = RunDir.save_part
    calls = {"n": 0}

    def flaky(self, key, table):
        calls["n"] += 1
        if calls["n"] == 2:  # after the mass part, before the first effect part
            raise KeyboardInterrupt
        real(self, key, table)

    monkeypatch.setattr(RunDir, "save_part", flaky)
    assert main(args(out)) == 130
    assert json.loads((out / "manifest.json").read_text())["status"] == "interrupted"
    monkeypatch.setattr(RunDir, "save_part", real)
    assert main(args(out)) == 0
    got = pd.read_parquet(out / "results.parquet")
    pd.testing.assert_frame_equal(got, pd.read_parquet(done / "results.parquet"))


def test_cli_patch_and_words(tmp_path, capsys):
    out = tmp_path / "patch"
    assert main(args(out, "--method", "patch")) == 0
    text = capsys.readouterr().out
    assert "top heads by |effect| of patch" in text and "Spearman rho" in text
    model, tok = gt.load()
    batch = RunDir(out, {}).load_tokens()
    cf = gt.induction(6)[1]  # the statistics split, patched in position by position
    patch = hl.Patch(hl.record(model, cf.model_inputs()))
    want = hl.evaluate(model, batch, ["ce"], plan=hl.Plan.of({(0, 2): patch}))["ce"].mean
    got = pd.read_parquet(out / "results.parquet").set_index(["layer", "head"])
    assert got.loc[(0, 2), "value"] == pytest.approx(want, rel=1e-5)
    assert set(got["method"]) == {"patch"}
    # a word list: only the prompts that contain a word are measured (for both rankings)
    ids = batch.input_ids[0, 1:3].tolist()
    words = [tok.decode([i]).strip() for i in ids]
    assert main(args(tmp_path / "words", "--tokens", ",".join(words))) == 0
    got = pd.read_parquet(tmp_path / "words" / "results.parquet")
    holds = (batch.input_ids[:, :, None] == torch.tensor(ids)).any(-1)  # [batch, pos]
    has_query = holds[:, :-1].any(1)  # a word before the last scored query position
    assert set(got["keys"]) == {"words"} and set(got["n"]) == {int(has_query.sum())}


def test_cli_prompt_only_and_bad_input(tmp_path, capsys):
    out = tmp_path / "prompt"
    argv = ["attention", "--model", GT, "--prompt", PROMPT, "--layers", "1", "--out", str(out)]
    assert main([*argv, "--quiet"]) == 0
    assert (out / "attention_grid.png").is_file() and not (out / "results.parquet").exists()
    capsys.readouterr()
    assert main(["attention", "--model", GT, "--out", str(tmp_path / "x")]) == 2
    assert "give --prompt TEXT" in capsys.readouterr().err
    long = " ".join(["t3"] * 130)
    assert main(["attention", "--model", GT, "--prompt", long, "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert "131 tokens but the model's context holds 128" in err and "shorten" in err
    assert not (tmp_path / "y").exists()  # refused before the run directory is written
    assert main(args(tmp_path / "z", "--method", "sideways")) == 2
    assert "sideways" in capsys.readouterr().err
    assert main(args(tmp_path / "w", "--heads", "1.1")) == 2
    assert "give --prompt" in capsys.readouterr().err


def test_cli_mean_ablation_uses_the_run_statistics(tmp_path):
    out = tmp_path / "mean"
    assert main(args(out, "--method", "mean", "--bins", "50")) == 0
    model, _ = gt.load()
    stats = hl.Stats.load(out / "stats.safetensors", model=model)
    batch = RunDir(out, {}).load_tokens()
    plan = hl.Plan.of({(1, 1): hl.Mean()})
    want = hl.evaluate(model, batch, ["ce"], plan=plan, stats=stats)["ce"].mean
    got = pd.read_parquet(out / "results.parquet").set_index(["layer", "head"])
    assert got.loc[(1, 1), "value"] == pytest.approx(want, rel=1e-5)
    assert set(got["method"]) == {"mean"}
