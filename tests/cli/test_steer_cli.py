"""`headlab steer` end to end on a tiny local Llama: numbers against weight-edit oracles,
resumption, and bad input."""

from __future__ import annotations

import json
from functools import partial

import pandas as pd
import pytest
from oracles import edited

import headlab as hl
from headlab.analyses.steer import GenerateConfig, generate_texts, random_sets
from headlab.analyses.steer.concepts import concept_rate, concept_tokens
from headlab.analyses.steer.select import ConceptMass, concept_batch
from headlab.cli.app import main
from headlab.data.blocks import make_blocks
from headlab.data.corpora import load_texts
from headlab.models.load import load_model
from headlab.runs import RunDir

WORDS = "the,of,to,is"
PROMPTS = ["The value of the", "It is used to", "This function returns", "A list of"]


def steer_args(folder, out, prompts, *extra):
    return ["steer", "--model", folder, "--concept", WORDS, "--prompts", str(prompts),
            "--alphas", "0,2", "--n-random", "2", "--max-new-tokens", "6", "--k", "2",
            "--seq-len", "16", "--n-blocks", "2", "--off-task", "induction", "--n-task", "2",
            "--batch-size", "2", "--quiet", "--out", str(out), *extra]  # fmt: skip


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


@pytest.fixture(scope="module")
def steered(tiny_folder, prompts, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "steer"
    assert main(steer_args(tiny_folder, out, prompts)) == 0
    return out


def test_steer_cli_numbers_equal_weight_edit_oracles(tiny_folder, steered):
    table = pd.read_parquet(steered / "results.parquet")
    # clean + 2 alphas x (selected + 2 random sets), each: concept rate and log-mass, corpus ce,
    # task ce
    assert len(table) == 7 * 4
    assert set(table.target) == {"concept", "python-docs", "induction"}
    heads = pd.read_csv(steered / "heads.csv")
    assert len(heads) == 12 and list(heads["rank"]) == list(range(1, 13))
    selected = [(int(r.layer), int(r.head)) for r in heads.head(2).itertuples()]
    manifest = json.loads((steered / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["heads"] == [list(h) for h in selected]

    model, tok = load_model(tiny_folder)
    layout = hl.describe(model)
    assert manifest["random"] == {
        str(s): [list(h) for h in v]
        for s, v in random_sets(layout, 2, 2, seed=0, exclude=selected).items()
    }
    oracle = edited(model, [(ly, h, "scale", 2.0) for ly, h in selected])
    blocks, _ = make_blocks(tok, load_texts("python-docs"), seq_len=16, n_blocks=2,
                            n_stats_blocks=1, seed=0, max_positions=128)  # fmt: skip
    want_ce = hl.evaluate(oracle, blocks, ["ce"])["ce"].mean
    sel2 = table[(table.selection == "selected") & (table.alpha == 2.0)]
    ce2 = sel2.set_index("target").loc["python-docs"]
    assert ce2["value"] == pytest.approx(want_ce, rel=1e-5)
    ids = concept_tokens(tok, WORDS.split(",")).token_ids
    mass = ConceptMass(ids)(oracle(**concept_batch(tok, PROMPTS).model_inputs()).logits,
                            concept_batch(tok, PROMPTS))  # fmt: skip
    assert sel2.set_index("metric").loc["concept_logmass", "value"] == pytest.approx(
        mass.mean, rel=1e-5
    )
    clean_ce = hl.evaluate(model, blocks, ["ce"])["ce"].mean
    assert ce2["baseline"] == pytest.approx(clean_ce, rel=1e-5)
    assert ce2["delta"] == pytest.approx(want_ce - clean_ce, abs=1e-5)

    gens = pd.read_json(steered / "generations.jsonl", lines=True)
    assert len(gens) == 7 * len(PROMPTS)
    g2 = gens[(gens.selection == "selected") & (gens.alpha == 2.0)].sort_values("prompt_index")
    cfg = GenerateConfig(max_new_tokens=6, seed=0)
    assert list(g2.text) == generate_texts(oracle, tok, PROMPTS, cfg)
    words = WORDS.split(",")
    rate = sel2.set_index("metric").loc["concept_rate", "value"]
    assert rate == pytest.approx(concept_rate(list(g2.text), words)[0])
    clean_texts = gens[gens.selection == "clean"].sort_values("prompt_index").text
    assert list(clean_texts) == generate_texts(model, tok, PROMPTS, cfg)
    for name in ("steer.png", "summary.csv", "heads.csv"):
        assert (steered / name).is_file()
    summary = pd.read_csv(steered / "summary.csv")
    assert list(summary.alpha) == [0.0, 2.0]
    rand0 = table[
        (table.selection == "random") & (table.alpha == 0.0) & (table.metric == "concept_rate")
    ]
    assert summary.random_mean[0] == pytest.approx(rand0.value.mean())
    assert summary.random_sd[0] == pytest.approx(rand0.value.std())


def test_steer_cli_resumes_to_the_same_table(tiny_folder, prompts, steered, tmp_path, monkeypatch):
    out = tmp_path / "again"
    real = RunDir.save_part
    calls = {"n": 0}

    def flaky(self, key, table):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        real(self, key, table)

    monkeypatch.setattr(RunDir, "save_part", flaky)
    assert main(steer_args(tiny_folder, out, prompts)) == 130
    assert json.loads((out / "manifest.json").read_text())["status"] == "interrupted"
    monkeypatch.setattr(RunDir, "save_part", real)
    assert main(steer_args(tiny_folder, out, prompts)) == 0
    got = pd.read_parquet(out / "results.parquet")
    pd.testing.assert_frame_equal(got, pd.read_parquet(steered / "results.parquet"))


def test_steer_cli_explicit_heads_and_sweep(tiny_folder, prompts, tmp_path):
    out = tmp_path / "heads"
    argv = steer_args(tiny_folder, out, prompts, "--heads", "2.1,0.3", "--n-random", "1",
                      "--data", "none", "--off-task", "none")  # fmt: skip
    assert main(argv) == 0
    table = pd.read_parquet(out / "results.parquet")
    assert set(table.heads[table.selection == "selected"]) == {"2.1,0.3"}
    assert set(table.target) == {"concept"} and len(table) == 2 * (1 + 2 + 2)
    out = tmp_path / "sweep"
    argv = steer_args(tiny_folder, out, prompts, "--select", "sweep", "--n-random", "0",
                      "--alphas", "0", "--data", "none", "--off-task", "none")  # fmt: skip
    assert main(argv) == 0
    sweep = pd.read_csv(out / "heads_sweep.csv")
    top = [(int(r.layer), int(r.head)) for r in sweep.head(2).itertuples()]
    assert json.loads((out / "manifest.json").read_text())["heads"] == [list(h) for h in top]
    assert (sweep["effect"].diff().dropna() <= 0).all()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--alphas", ""], "alpha list is empty"),
        (["--concept", "the,with", "--multi-token", "refuse"], "with"),
        (["--concept", "flavours"], "unknown concept 'flavours'"),
        (["--select", "heads"], "needs --heads"),
        (["--max-new-tokens", "200"], "exceeds the model's context of 128"),
        (["--prompts", "/nonexistent/prompts.txt"], "no such file"),
    ],
)
def test_steer_cli_bad_input(tiny_folder, prompts, tmp_path, capsys, extra, message):
    assert main(steer_args(tiny_folder, tmp_path / "bad", prompts, *extra)) == 2
    err = capsys.readouterr().err
    assert "headlab: error:" in err and message in err


def test_multi_token_words_warn_naming_them(tiny_folder, prompts, tmp_path):
    argv = steer_args(tiny_folder, tmp_path / "warn", prompts, "--concept", "the,with",
                      "--n-random", "0", "--alphas", "2", "--data", "none",
                      "--off-task", "none")  # fmt: skip
    with pytest.warns(UserWarning, match="first token of ' word' instead: with"):
        assert main(argv) == 0
    words = pd.read_parquet(tmp_path / "warn" / "results.parquet")
    assert set(words.metric) == {"concept_rate", "concept_logmass"}


def test_steer_api_equals_the_cli_table(tiny_folder, steered):
    from headlab.analyses.steer import SteerConfig, steer
    from headlab.analyses.steer.concepts import get_concept
    from headlab.data.tasks import load_task

    model, tok = load_model(tiny_folder)
    selected = [tuple(h) for h in json.loads((steered / "manifest.json").read_text())["heads"]]
    blocks, _ = make_blocks(tok, load_texts("python-docs"), seq_len=16, n_blocks=2,
                            n_stats_blocks=1, seed=0, max_positions=128)  # fmt: skip
    targets = {"python-docs": (blocks, "ce"),
               "induction": (load_task("induction", tok, n=2, seed=0).eval, "ce")}  # fmt: skip
    config = SteerConfig(alphas=(0.0, 2.0), n_random=2, batch_size=2,
                         generate=GenerateConfig(max_new_tokens=6))  # fmt: skip
    concept = get_concept(WORDS.split(","), prompts=PROMPTS)
    ids = concept_tokens(tok, WORDS.split(",")).token_ids
    res = steer(model, tok, concept, selected, config=config, targets=targets, token_ids=ids)
    pd.testing.assert_frame_equal(res.table, pd.read_parquet(steered / "results.parquet"))
    assert res.random == {s: v for s, v in random_sets(hl.describe(model), 2, 2,
                                                        exclude=selected).items()}  # fmt: skip


def test_python_twin_writes_the_cli_run_directory(tiny_folder, steered, tmp_path):
    out = tmp_path / "twin"
    res = hl.run_steer(
        out=out, model=tiny_folder, concept=WORDS, prompts=PROMPTS, alphas=(0.0, 2.0),
        n_random=2, max_new_tokens=6, k=2, seq_len=16, n_blocks=2, off_task="induction",
        n_task=2, batch_size=2,
    )  # fmt: skip
    assert res.run_dir.path == out
    readers = {
        "results.parquet": pd.read_parquet,
        "heads.csv": pd.read_csv,
        "summary.csv": pd.read_csv,
        "generations.jsonl": partial(pd.read_json, lines=True),
    }
    for name, read in readers.items():
        pd.testing.assert_frame_equal(read(out / name), read(steered / name))
    pd.testing.assert_frame_equal(res.table, pd.read_parquet(steered / "results.parquet"))
    mine, theirs = (json.loads((d / "manifest.json").read_text()) for d in (out, steered))
    for key in ("kind", "identity", "status", "heads", "random"):
        assert mine[key] == theirs[key], key
    assert sorted((out / "parts").iterdir()) == sorted(
        out / "parts" / p.name for p in (steered / "parts").iterdir()
    )
