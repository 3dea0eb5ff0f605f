"""``--counterfactual FILE`` end to end on a tiny local model: ``sweep --method patch`` against
the Python API, the tokens in the run directory and their check on resume, bad pairs files,
``compare`` (``atp:patch`` against exact patching), ``estimate`` and ``attention``."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import torch

import headlab as hl
from headlab.analyses.estimate import estimate_terms, per_example_estimates
from headlab.cli.app import main
from headlab.models.load import load_model
from headlab.runs import RunDir

# pairs of 12 and 13 tokens for the tiny folder's tokenizer (the shorter one is left-padded)
PAIRS = [
    {"clean": "The value of the name is", "corrupted": "The type of the name is",
     "answer": " the", "wrong": " a"},
    {"clean": "The value of the list is", "corrupted": "The class of the module is",
     "answer": " a", "wrong": " the"},
    {"clean": "A value of an object is", "corrupted": "The class of the module is",
     "answer": " the", "wrong": " a"},
]  # fmt: skip


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    return write(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", PAIRS)


def sweep_args(folder, pairs, out, *extra):
    return ["sweep", "--model", folder, "--counterfactual", pairs, "--method", "patch,zero",
            "--out", str(out), "--quiet", "--batch-size", "2", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def swept(tiny_folder, pairs_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "sweep"
    assert main(sweep_args(tiny_folder, pairs_file, out)) == 0
    return out


def test_cli_sweep_patch_equals_the_python_api(tiny_folder, pairs_file, swept):
    model, tok = load_model(tiny_folder)
    pairs = hl.load_pairs(pairs_file, tok)
    acts = hl.record(model, pairs.corrupted.model_inputs())  # [batch, pos, head, d_head] per layer
    layout = hl.describe(model)
    heads = [(ly, h) for ly in range(layout.n_layers) for h in range(layout.n_heads)]
    plans = [hl.Plan()] + [hl.Plan.of({head: hl.Patch(acts)}) for head in heads]
    clean, *scores = hl.run_plans(model, pairs.clean, plans, ["logit_diff"])
    table = pd.read_parquet(swept / "results.parquet")
    patch = table[table.method == "patch"].set_index(["layer", "head"])
    assert len(patch) == len(heads) and set(table.metric) == {"logit_diff"}
    for head, s in zip(heads, scores, strict=True):
        assert patch.loc[head, "value"] == pytest.approx(s["logit_diff"].mean, abs=1e-6)
        assert patch.loc[head, "baseline"] == pytest.approx(clean["logit_diff"].mean, abs=1e-6)
    assert patch["delta"].abs().max() > 1e-3
    # the evaluated examples are the clean sides; the counterfactual tokens are saved beside them
    run = RunDir(swept, {})
    assert torch.equal(run.load_tokens().input_ids, pairs.clean.input_ids)
    saved = run.load_tokens("counterfactual.safetensors")
    assert torch.equal(saved.input_ids, pairs.corrupted.input_ids)
    assert torch.equal(saved.attention_mask, pairs.corrupted.attention_mask)
    manifest = json.loads((swept / "manifest.json").read_text())
    assert set(manifest["files"]["counterfactual.safetensors"]) >= {"sha256", "size"}
    identity = manifest["identity"]
    assert identity["counterfactual"] == "file" and identity["n_blocks"] == 3
    assert identity["data"] is None and len(identity["counterfactual_fingerprint"]) == 64


def test_resume_verifies_the_counterfactual_tokens(tiny_folder, pairs_file, swept, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(swept, out)
    good = (out / "counterfactual.safetensors").read_bytes()
    (out / "counterfactual.safetensors").write_bytes(good[:-8] + b"damaged!")
    with pytest.warns(RuntimeWarning, match="counterfactual.safetensors failed its checksum"):
        assert main(sweep_args(tiny_folder, pairs_file, out)) == 0
    assert (out / "counterfactual.safetensors").read_bytes() == good  # found damaged, rewritten
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["resumed"] == 1 and manifest["status"] == "complete"
    pd.testing.assert_frame_equal(
        pd.read_parquet(out / "results.parquet"), pd.read_parquet(swept / "results.parquet")
    )
    # other corrupted sides are another run: refused, not resumed
    other = write(
        tmp_path / "other.jsonl", [{**PAIRS[0], "corrupted": PAIRS[1]["clean"]}, *PAIRS[1:]]
    )
    assert main(sweep_args(tiny_folder, other, out)) == 2


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({**PAIRS[0], "corrupted": "The type of the list is"},
         "line 2: clean 12 tokens, corrupted 13"),
        ({**PAIRS[0], "answer": " value"}, "line 2 answer ' value' is 4 tokens"),
        ({"clean": "The value", "answer": " the"}, "line 2 lacks corrupted"),
    ],
)  # fmt: skip
def test_bad_pairs_files_fail_with_named_errors(tiny_folder, tmp_path, capsys, record, message):
    bad = write(tmp_path / "bad.jsonl", [PAIRS[0], record])
    assert main(sweep_args(tiny_folder, bad, tmp_path / "out")) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before any run directory


def test_patch_needs_a_counterfactual(tiny_folder, pairs_file, tmp_path, capsys):
    argv = ["sweep", "--model", tiny_folder, "--method", "patch", "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    assert "give --counterfactual FILE.jsonl" in capsys.readouterr().err
    assert main([*argv, "--counterfactual", pairs_file, "--task", "names"]) == 2
    assert "drop --task names" in capsys.readouterr().err
    assert main([*argv, "--counterfactual", str(tmp_path / "none.jsonl")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_compare_atp_patch_against_exact_patch(tiny_folder, pairs_file, swept, tmp_path, capsys):
    out = tmp_path / "compare"
    argv = ["compare", "--model", tiny_folder, "--counterfactual", pairs_file, "--methods",
            "patch", "--measures", "atp", "--bootstrap", "20", "--top-k", "3", "--out", str(out),
            "--quiet", "--batch-size", "2"]  # fmt: skip
    assert main(argv) == 0
    agreement = pd.read_csv(out / "agreement.csv")
    assert agreement["reference"].tolist() == ["ablation:patch"]
    assert agreement["measure"].tolist() == ["atp:patch"]
    assert "atp:patch" in capsys.readouterr().out
    per = pd.read_parquet(out / "per_example.parquet")
    # exact patching per example averages to the sweep's patch deltas (same examples, same pairs)
    exact = per[per.measure == "ablation:patch"]
    mean = (exact.value * exact.weight).groupby([exact.layer, exact["head"]]).sum() / 3
    sweep = pd.read_parquet(swept / "results.parquet")
    sweep = sweep[sweep.method == "patch"].set_index(["layer", "head"])["delta"]
    assert mean.to_numpy() == pytest.approx(sweep.sort_index().to_numpy(), abs=1e-6)
    # attribution patching per example is what the Python API estimates from the same pairs
    model, tok = load_model(tiny_folder)
    pairs = hl.load_pairs(pairs_file, tok)
    terms = estimate_terms(model, pairs.clean, methods=["atp:patch"], metric="logit_diff",
                           counterfactual=pairs.corrupted)  # fmt: skip
    want = per_example_estimates(terms).sort_values(["example", "layer", "head"])
    got = per[per.measure == "atp:patch"].sort_values(["example", "layer", "head"])
    assert got.value.to_numpy() == pytest.approx(want.value.to_numpy(), abs=1e-6)
    assert (out / "counterfactual.safetensors").is_file()


def test_estimate_saves_per_example_values_and_checks_patching(
    tiny_folder, pairs_file, swept, tmp_path
):
    out = tmp_path / "estimate"
    argv = ["estimate", "--model", tiny_folder, "--counterfactual", pairs_file, "--method",
            "atp:patch,atp:zero", "--exact-top", "2", "--n-random", "2", "--out", str(out),
            "--quiet", "--batch-size", "2"]  # fmt: skip
    assert main(argv) == 0
    per = pd.read_parquet(out / "per_example.parquet")
    assert set(per.method) == {"atp:patch", "atp:zero"} and set(per.example) == {0, 1, 2}
    estimates = pd.read_parquet(out / "estimates.parquet").set_index(["method", "layer", "head"])
    for (method, layer, head), g in per.groupby(["method", "layer", "head"]):
        mean = (g.value * g.weight).sum() / g.weight.sum()
        assert mean == pytest.approx(estimates.loc[(method, layer, head), "delta"], abs=1e-9)
    # the exact check of atp:patch is exact patching from the same pairs: the sweep's numbers
    exact = pd.read_parquet(out / "exact.parquet")
    exact = exact[exact.method == "patch"].set_index(["layer", "head"])["delta"]
    sweep = pd.read_parquet(swept / "results.parquet")
    sweep = sweep[sweep.method == "patch"].set_index(["layer", "head"])["delta"]
    assert len(exact) == 4
    assert exact.to_numpy() == pytest.approx(sweep.loc[exact.index].to_numpy(), abs=1e-6)
    assert (out / "counterfactual.safetensors").is_file()


def test_attention_faithfulness_is_the_patching_effect(tiny_folder, tmp_path, capsys):
    def argv(pairs, out):
        return ["attention", "--model", tiny_folder, "--counterfactual", pairs, "--method",
                "patch", "--keys", "context", "--n-boot", "20", "--top-k", "3", "--out",
                str(out), "--quiet", "--batch-size", "2"]  # fmt: skip

    # attention patterns need pairs of one token length (PAIRS[0] and a 12-token twin)
    twin = {**PAIRS[0], "clean": PAIRS[0]["corrupted"], "corrupted": PAIRS[0]["clean"]}
    pairs = write(tmp_path / "one_length.jsonl", [PAIRS[0], twin])
    out = tmp_path / "attention"
    assert main(argv(pairs, out)) == 0
    table = pd.read_parquet(out / "results.parquet").set_index(["layer", "head"])["effect"]
    sweep = tmp_path / "sweep"
    assert main(sweep_args(tiny_folder, pairs, sweep)) == 0
    effect = pd.read_parquet(sweep / "results.parquet")
    effect = effect[effect.method == "patch"].set_index(["layer", "head"])["effect"]
    assert table.sort_index().to_numpy() == pytest.approx(effect.sort_index().to_numpy(), abs=1e-6)
    assert json.loads((out / "manifest.json").read_text())["summary"]["method"] == "patch"
    assert (out / "counterfactual.safetensors").is_file()
    capsys.readouterr()
    assert main(argv(write(tmp_path / "mixed.jsonl", PAIRS), tmp_path / "mixed")) == 2
    assert "need pairs of one token length" in capsys.readouterr().err
