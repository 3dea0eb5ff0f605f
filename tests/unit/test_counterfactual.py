"""Patching from counterfactual pairs: exact ``patch`` against a hook oracle written here, the
pairs file format and its errors, the built-in minimal pairs, per-example estimates."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import tiny_models as T
import torch
from test_data import task_words, word_tokenizer

import headlab as hl
from headlab.analyses.estimate import estimate_tables, estimate_terms, per_example_estimates
from headlab.analyses.sweep import COUNTERFACTUAL, method_intervention, sweep
from headlab.data import load_task, tasks
from headlab.data.counterfactual import load_pairs
from headlab.errors import ConfigError
from headlab.parts import Context

FAMILIES = ["llama_gqa", "gpt2", "qwen3"]


def oracle_ce(model, batch, corrupted, layer, head):
    """CE of ``batch`` with ``(layer, head)``'s output-projection input columns replaced by
    their values on ``corrupted``: two forwards with pre-hooks written here (not headlab's)."""
    layout = hl.describe(model)
    proj, d = layout.out_projs[layer], layout.d_head
    cols = slice(head * d, (head + 1) * d)
    seen = {}

    def keep(mod, args):
        seen["z"] = args[0][..., cols].clone()

    def swap(mod, args):
        x = args[0].clone()
        x[..., cols] = seen["z"]
        return (x, *args[1:])

    with torch.no_grad():
        handle = proj.register_forward_pre_hook(keep)
        try:
            model(input_ids=corrupted.input_ids)
        finally:
            handle.remove()
        handle = proj.register_forward_pre_hook(swap)
        try:
            logits = model(input_ids=batch.input_ids).logits
        finally:
            handle.remove()
    return hl.get_metric("ce")(logits, batch).mean


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    model = T.build(request.param).double()
    batch = hl.Batch(**T.inputs(request.param, batch=5, seed=1))
    corrupted = hl.Batch(**T.inputs(request.param, batch=5, seed=2))
    return model, batch, corrupted


def test_exact_patch_of_every_head_equals_a_pre_hook_oracle(family):
    model, batch, corrupted = family
    table = sweep(
        model, batch, methods=["patch"], metrics=["ce"], counterfactual=corrupted,
        batch_size=2,  # three sub-batches: the recorded rows must follow the example offset
    )  # fmt: skip
    layout = hl.describe(model)
    assert len(table) == layout.n_layers * layout.n_heads and set(table.method) == {"patch"}
    for r in table.itertuples():
        want = oracle_ce(model, batch, corrupted, r.layer, r.head)
        assert r.value == pytest.approx(want, abs=1e-6)
    assert table["delta"].abs().max() > 1e-3  # patching in other inputs changes the numbers


def test_patching_a_head_with_itself_changes_nothing(family):
    model, batch, _ = family
    table = sweep(model, batch, methods=["patch"], metrics=["ce"], counterfactual=batch,
                  batch_size=2)  # fmt: skip
    assert (table["delta"] == 0).all()


def test_patch_is_recorded_once_per_part_for_its_layers_only(family):
    model, batch, corrupted = family
    layout = hl.describe(model)
    ctx = Context(model, layout, batch, batches={COUNTERFACTUAL: corrupted}, batch_size=2)
    iv = method_intervention("patch", ctx, layers=[1])
    assert iv.source.layers == [1]
    want = hl.record(model, corrupted.model_inputs(), layers=[1])[1]
    assert torch.equal(iv.source[1], want)
    assert method_intervention("zero", ctx) == hl.Zero()


def test_patch_without_a_counterfactual_names_the_option(family):
    model, batch, _ = family
    with pytest.raises(ConfigError, match=r"--counterfactual FILE\.jsonl"):
        sweep(model, batch, methods=["patch"])
    with pytest.raises(ConfigError, match="position by position"):
        sweep(model, batch, methods=["patch"], counterfactual=batch.slice(0, 2))
    with pytest.raises(ConfigError, match="or patch"):
        sweep(model, batch, methods=["patchy"])


# --- the pairs file ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer([*task_words(), "the cat sat on a mat"])


def write(path, lines):
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


IOI = {
    "clean": "When Mary and John went to the store, John gave a drink to",
    "corrupted": "When Amy and Lisa went to the store, Tom gave a drink to",
    "answer": " Mary",
    "wrong": " John",
}


def test_pairs_become_a_clean_batch_and_a_position_aligned_counterfactual(tok, tmp_path):
    short = {"clean": "the cat sat", "corrupted": "the mat sat", "answer": " on", "wrong": " a"}
    pairs = load_pairs(write(tmp_path / "p.jsonl", [IOI, short]), tok)
    assert pairs.metric == "logit_diff" and len(pairs) == 2 and pairs.lines == (1, 2)
    clean, cf = pairs.clean, pairs.corrupted
    n = len(tok(IOI["clean"])["input_ids"])
    assert clean.input_ids.shape == cf.input_ids.shape == (2, n)
    # the short pair is left-padded the same way on both sides; the answer is the last token
    assert clean.attention_mask[1].tolist() == [0] * (n - 3) + [1] * 3
    assert torch.equal(clean.attention_mask, cf.attention_mask)
    assert tok.decode(clean.input_ids[1, -3:]) == "the cat sat"
    assert tok.decode(cf.input_ids[1, -3:]) == "the mat sat"
    assert (clean.answer_pos == n - 1).all()
    assert clean.correct.tolist() == [tok(" Mary")["input_ids"][0], tok(" on")["input_ids"][0]]
    assert clean.wrong.tolist() == [tok(" John")["input_ids"][0], tok(" a")["input_ids"][0]]
    assert torch.equal(cf.correct, clean.correct) and torch.equal(cf.wrong, clean.wrong)
    no_wrong = {k: v for k, v in IOI.items() if k != "wrong"}
    assert load_pairs(write(tmp_path / "q.jsonl", [no_wrong]), tok).metric == "answer_logprob"


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([IOI, {**IOI, "corrupted": "When Amy and Lisa went to the store, Tom gave to"}],
         r"line 2: clean 14 tokens, corrupted 12"),
        ([{**IOI, "answer": " Mary John"}], r"line 1 answer ' Mary John' is 2 tokens"),
        ([IOI, {**IOI, "wrong": " Zorblax"}], r"line 2 wrong ' Zorblax' is"),
        ([IOI, "", IOI], r"line 2 is empty"),
        ([IOI, '{"clean": "x",'], r"line 2 is not valid JSON"),
        (["[1, 2]"], r"line 1 is a JSON list, not an object"),
        ([{"clean": "a", "answer": " Mary"}], r"line 1 lacks corrupted"),
        ([{**IOI, "id": 3}], r"line 1 has unknown field\(s\) id"),
        ([{**IOI, "answer": ""}], r"line 1: answer must be non-empty text"),
        ([IOI, {k: v for k, v in IOI.items() if k != "wrong"}], r"lines 2 lack 'wrong'"),
        ([{**IOI, "wrong": " Mary"}], r"lines 1 give the same token as answer and wrong"),
        ([], r"holds no pairs"),
    ],
)  # fmt: skip
def test_bad_pairs_files_are_refused_naming_the_line(tok, tmp_path, lines, message):
    with pytest.raises(ConfigError, match=message):
        load_pairs(write(tmp_path / "bad.jsonl", lines), tok)


def test_a_missing_or_non_utf8_pairs_file_is_refused(tok, tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_pairs(tmp_path / "absent.jsonl", tok)
    (tmp_path / "latin1.jsonl").write_bytes(b'{"clean": "caf\xe9"}\n')
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_pairs(tmp_path / "latin1.jsonl", tok)


# --- built-in minimal pairs ----------------------------------------------------------------------


def check_names_pairs(tok, task):
    """Every pair: one length, the template's tokens equal, three other names in the name slots."""
    names = {tok(" " + w, add_special_tokens=False)["input_ids"][0] for w in tasks._NAMES}
    clean, cf = task.eval, task.counterfactual
    assert cf.input_ids.shape == clean.input_ids.shape
    assert torch.equal(cf.answer_pos, clean.answer_pos) and torch.equal(cf.correct, clean.correct)
    rows = zip(clean.input_ids.tolist(), cf.input_ids.tolist(), clean.correct.tolist(),
               clean.wrong.tolist(), strict=True)  # fmt: skip
    for row, other, io, s in rows:
        slots = [i for i, t in enumerate(row) if t in names]
        assert len(slots) == 3  # A, B and S
        assert [t for i, t in enumerate(row) if i not in slots] == [
            t for i, t in enumerate(other) if i not in slots
        ]  # same template, place and object
        fresh = [other[i] for i in slots]
        assert len(set(fresh)) == 3 and not {io, s} & set(fresh)
        assert all(t in names for t in fresh)


def test_names_minimal_pairs_are_the_abc_counterfactual(tok):
    task = load_task("names", tok, n=30, seed=3)
    check_names_pairs(tok, task)
    # building the pairs leaves the examples as they were: the same as another call's
    assert torch.equal(task.eval.input_ids, load_task("names", tok, n=30, seed=3).eval.input_ids)
    assert load_task("induction", tok, n=2).counterfactual is None


def check_capitals_pairs(tok, task):
    clean, cf = task.eval, task.counterfactual
    table = [p.replace("_", " ").split(":") for p in tasks._CAPITALS.split()]
    rows = zip(clean.input_ids.tolist(), cf.input_ids.tolist(), clean.wrong.tolist(), strict=True)
    for row, other, wrong in rows:
        assert len(row) == len(other)
        assert row != other  # another country, at the same positions
        text = tok.decode(other)
        # the country swapped in is the one whose capital is the wrong answer
        assert any(
            tok(" " + city, add_special_tokens=False)["input_ids"][0] == wrong and country in text
            for country, city in table
        )


def test_capitals_minimal_pairs_swap_in_the_country_of_the_wrong_answer(tok):
    check_capitals_pairs(tok, load_task("capitals", tok, n=20, seed=1))


@pytest.mark.slow
def test_builtin_pairs_on_the_default_tokenizer():
    _, tok = hl.load_model("smollm2-135m")
    check_names_pairs(tok, load_task("names", tok, n=64, seed=0))
    check_capitals_pairs(tok, load_task("capitals", tok, n=64, seed=0))


# --- per-example estimates -----------------------------------------------------------------------


def test_per_example_estimates_average_to_the_estimate_table():
    model = T.build("llama_gqa").double()
    batch = hl.Batch(**T.inputs("llama_gqa", batch=4, seed=1))
    other = hl.Batch(**T.inputs("llama_gqa", batch=4, seed=5))
    methods = ["atp:zero", "atp:patch", "gradient"]
    out = estimate_tables(model, batch, methods=methods, counterfactual=other, batch_size=3)
    per = out.per_example
    assert list(per.columns) == ["layer", "head", "example", "method", "metric", "value", "weight"]
    assert len(per) == 3 * 4 * 8 and set(per.example) == {0, 1, 2, 3}
    terms = estimate_terms(model, batch, methods=methods, counterfactual=other)
    again = per_example_estimates(terms).sort_values(["method", "layer", "head", "example"])
    pd.testing.assert_frame_equal(again.reset_index(drop=True), per, rtol=1e-10)
    for method in ("atp:zero", "atp:patch"):
        rows = per[per.method == method]
        mean = (rows.value * rows.weight).groupby([rows.layer, rows["head"]]).sum() / rows.groupby(
            ["layer", "head"]
        ).weight.sum()
        table = out.table[out.table.method == method].set_index(["layer", "head"])["delta"]
        assert mean.to_numpy() == pytest.approx(table.sort_index().to_numpy(), rel=1e-9)
    grad = per[per.method == "gradient"].assign(value=lambda t: t.value.abs())
    raw = grad.groupby(["layer", "head"]).value.mean()
    table = out.table[out.table.method == "gradient"].set_index(["layer", "head"])["delta"]
    assert raw.to_numpy() == pytest.approx(table.sort_index().to_numpy(), rel=1e-9)


# --- the built-in pairs through the command line -------------------------------------------------


def test_cli_sweep_patches_in_the_builtin_names_pairs_by_default(tok, tmp_path, capsys):
    from tiny_folder import make_model_folder

    from headlab.cli.app import main
    from headlab.models.load import load_model
    from headlab.runs import RunDir

    folder = str(make_model_folder(tmp_path / "model", tokenizer=tok))
    out = tmp_path / "run"

    def argv(task, method, where, *extra):
        return ["sweep", "--model", folder, "--task", task, "--n-blocks", "4", "--method", method,
                "--out", str(where), "--quiet", "--batch-size", "3", *extra]  # fmt: skip

    assert main(argv("names", "patch", out)) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["identity"]["counterfactual"] == "builtin"
    assert "counterfactual.safetensors" in manifest["files"]
    model, tokenizer = load_model(folder)
    task = load_task("names", tokenizer, n=4)
    run = RunDir(out, {})
    saved = run.load_tokens("counterfactual.safetensors")
    assert torch.equal(saved.input_ids, task.counterfactual.input_ids)
    assert torch.equal(run.load_tokens().input_ids, task.eval.input_ids)
    table = pd.read_parquet(out / "results.parquet").set_index(["layer", "head"])
    acts = hl.record(model, task.counterfactual.model_inputs())
    for layer, head in [(0, 1), (2, 3)]:
        plan = hl.Plan.of({(layer, head): hl.Patch(acts)})
        want = hl.evaluate(model, task.eval, ["logit_diff"], plan=plan)["logit_diff"].mean
        assert table.loc[(layer, head), "value"] == pytest.approx(want, abs=1e-6)
    # the same sweep without patching keeps the identity it always had
    zero = tmp_path / "zero"
    assert main(argv("names", "zero", zero)) == 0
    identity = json.loads((zero / "manifest.json").read_text())["identity"]
    assert "counterfactual" not in identity and not (zero / "counterfactual.safetensors").exists()
    capsys.readouterr()
    assert main(argv("induction", "patch", tmp_path / "i", "--counterfactual", "builtin")) == 2
    assert "built-in minimal pairs exist for --task names and --task capitals" in (
        capsys.readouterr().err
    )
