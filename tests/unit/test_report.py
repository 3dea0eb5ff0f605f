"""`headlab report` / `hl.report`: the head atlas of run directories, one offline HTML file.

Runs of every kind are made once on a tiny local model; the atlas's embedded numbers are checked
against the tables the jobs wrote (and the 95 % interval, ranks, attention patterns and promoted
tokens against independent computations), text from the runs is escaped, the file references
nothing outside itself, and bad input gets clear errors.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from tiny_folder import make_model_folder

import headlab as hl
from headlab.atlas import build_atlas
from headlab.cli.app import main
from headlab.errors import ConfigError

PROMPT = "<script>alert(1)</script> The cat & the hat"
DATA = ["--data", "python-docs", "--seq-len", "16", "--n-blocks", "3", "--n-stats-blocks", "4",
        "--batch-size", "2", "--quiet"]  # fmt: skip
TASK = ["--task", "induction", "--seq-len", "17", "--n-blocks", "3", "--n-stats-blocks", "3",
        "--quiet"]  # fmt: skip


def atlas_data(path: Path) -> dict:
    """The JSON the page embeds."""
    text = Path(path).read_text(encoding="utf-8")
    tag = '<script type="application/json" id="atlas-data">'
    start = text.index(tag) + len(tag)
    return json.loads(text[start : text.index("</script>", start)])


def find_map(data: dict, run: str, name: str) -> dict:
    found = [m for m in data["maps"] if m["run"] == run and m["name"] == name]
    assert len(found) == 1, [(m["run"], m["name"]) for m in data["maps"]]
    return found[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("atlas")
    folder = str(make_model_folder(root / "tiny"))
    model = ["--model", folder]
    out = SimpleNamespace(root=root, folder=folder)
    commands = {
        "sweep": ["sweep", *model, *DATA, "--method", "zero,mean", "--bins", "50", "--report"],
        "cascade": ["cascade", *model, *DATA, "--steps", "2", "--off-target", "none"],
        "detect": ["detect", *model, *DATA],
        "l0": ["l0", *model, *TASK, "--steps", "2", "--lam", "0,1"],
        "gate": ["gate", *model, *TASK, "--steps", "2", "--masks", "2"],
        "prune": ["prune", *model, *DATA, "--fractions", "0,0.5,1", "--seeds", "0",
                  "--method", "zero"],
        "attention": ["attention", *model, "--prompt", PROMPT, "--quiet"],
    }  # fmt: skip
    for name, argv in commands.items():
        setattr(out, name, root / name)
        assert main([*argv, "--out", str(root / name)]) == 0, name
    return out


def test_report_flag_writes_the_runs_atlas_with_the_sweeps_numbers(runs):
    path = runs.sweep / "atlas.html"
    assert path.is_file()  # `headlab sweep ... --report`
    data = atlas_data(path)
    table = pd.read_parquet(runs.sweep / "results.parquet")
    assert data["model"]["n_layers"] == 3 and data["model"]["n_heads"] == 4
    for method in ("zero", "mean"):
        m = find_map(data, "sweep", f"{method} / ce")
        heat = m["figure"]["data"][0]
        sub = table[(table.method == method) & (table.metric == "ce")]
        # the oracle: ranks by effect and Student's t interval, computed here independently
        order = sub.sort_values("effect", ascending=False, kind="stable")
        rank = {(r.layer, r.head): i + 1 for i, r in enumerate(order.itertuples())}
        from scipy.stats import t

        for r in sub.itertuples():
            lo, hi, n, rk, _ = heat["customdata"][r.layer][r.head]
            assert heat["z"][r.layer][r.head] == r.delta  # the same float, not a rounding
            half = t.ppf(0.975, r.n - 1) * r.delta_sd / math.sqrt(r.n)
            assert lo == pytest.approx(r.delta - half, rel=1e-9)
            assert hi == pytest.approx(r.delta + half, rel=1e-9)
            assert n == r.n and rk == rank[(r.layer, r.head)]
            label = heat["text"][r.layer][r.head]
            assert f"Δce = {r.delta:+.4g}" in label and f"rank {rk} of 12" in label
    assert data["maps"][0]["group"] == "sweep"  # the page opens on the sweep


def test_every_kind_of_run_is_read_into_maps_notes_and_panels(runs):
    atlas = build_atlas(
        [runs.sweep, runs.cascade, runs.detect, runs.l0, runs.gate, runs.prune, runs.attention],
        model=False,
    )
    assert not [n for r in atlas.runs for n in r.notes]  # every table was read
    names = {(m.run, m.group, m.name) for m in atlas.maps}
    assert ("detect", "detector", "previous_token") in names
    assert ("prune", "ranking sweep", "zero / ce") in names  # the sweep prune ran to rank heads
    assert {("l0", "L0 gate", "λ = 0"), ("l0", "L0 gate", "λ = 1")} <= names
    assert ("gate", "CHG gate", "G+ (keep)") in names
    l0 = pd.read_parquet(runs.l0 / "heads.parquet")
    m = next(m for m in atlas.maps if m.name == "λ = 1")
    want = l0[l0.lam == 1].sort_values(["layer", "head"])["gate"].to_numpy()
    np.testing.assert_array_equal(m.table["value"].to_numpy(), want)
    chg = pd.read_parquet(runs.gate / "heads.parquet").set_index(["layer", "head"])
    labels = {(n["layer"], n["head"]): n["text"] for n in atlas.notes if n["group"] == "CHG"}
    for (ly, h), row in chg.iterrows():
        assert labels[(ly, h)].startswith(f"CHG label: {row['label']} ")
    cascade = pd.read_parquet(runs.cascade / "results.parquet")
    for r in cascade[cascade.removed].itertuples():
        tags = [n["tag"] for n in atlas.notes if (n["layer"], n["head"]) == (r.layer, r.head)]
        assert f"removed in cascade round {r.step}" in tags
    panels = {(p.run, p.title.split(":")[0]) for p in atlas.panels}
    assert {("prune", "pruning curves (random orders"), ("cascade", "cascade"),
            ("gate", "gate fits"), ("l0", "L0 trade-off")} <= panels  # fmt: skip
    assert atlas.n_layers == 3 and atlas.n_heads == 4
    assert atlas.title == "Head atlas · tiny"


def test_cards_show_attention_patterns_and_promoted_tokens_of_the_model(runs, tmp_path):
    from transformers import AutoModelForCausalLM

    atlas = build_atlas([runs.sweep], model=True)
    views = atlas.views
    assert views is not None and views.patterns.shape == (3, 4, 16, 16)
    # the oracle: transformers' own eager attention on example 0 of the run's tokens
    ref = AutoModelForCausalLM.from_pretrained(runs.folder, attn_implementation="eager")
    from safetensors.torch import load_file

    ids = load_file(str(runs.sweep / "tokens.safetensors"))["input_ids"][:1]
    with torch.no_grad():
        attn = torch.stack(ref(input_ids=ids, output_attentions=True).attentions)[:, 0]
    assert np.abs(views.patterns / 255 - attn.numpy()).max() <= 0.5 / 255 + 1e-6
    # promoted tokens: W_U (g * W_O[:, cols] mu) in float64 with mu the statistics mean
    stats = hl.Stats.load(runs.sweep / "stats.safetensors")
    w_u = ref.lm_head.weight.double()
    gain = ref.model.norm.weight.double()
    o_proj = ref.model.layers[2].self_attn.o_proj.weight.double()  # [d_model, head * d_head]
    d = stats.d_head
    for h in range(4):
        x = o_proj[:, h * d : (h + 1) * d] @ stats.mean[2, h].double()
        logits = w_u @ (gain * x)
        logits = logits - logits.mean()
        top = logits.topk(8).indices.tolist()
        got = views.promoted[2][h]
        assert [v for _, v in got] == pytest.approx(logits[top].tolist(), abs=2e-4)
        assert len(views.suppressed[2][h]) == 8
    assert "stats.safetensors" in views.mean_source


def test_text_from_the_runs_is_escaped(runs, tmp_path):
    odd = tmp_path / "run <b>x</b>"
    shutil.copytree(runs.attention, odd)
    out = tmp_path / "atlas.html"
    hl.report([odd], out=out)
    page = out.read_text(encoding="utf-8")
    assert "<script>alert(1)" not in page and "<b>x</b>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt; The cat &amp; the hat" in page  # overview
    assert "run &lt;b&gt;x&lt;/b&gt;" in page  # the run's label
    assert len(re.findall(r"<script\b", page)) == 3  # data, plotly.js, glue: nothing injected
    data = atlas_data(out)  # the JSON still reads back to the run's own text
    tokens = "".join(data["views"]["tokens"])
    assert "<" in tokens and "script" in tokens  # the prompt's tokens label the pattern


def test_the_file_references_nothing_outside_itself(runs):
    from plotly.offline import get_plotlyjs

    page = (runs.sweep / "atlas.html").read_text(encoding="utf-8")
    assert page.count(get_plotlyjs()) == 1  # plotly.js inlined once
    for bad in (r"<script[^>]*\bsrc\s*=", r"<link\b", r"<img\b", r"<iframe\b", r"@import",
                r"url\(\s*['\"]?(https?:)?//"):  # fmt: skip
        assert not re.search(bad, page, re.I), bad
    ours = page.replace(get_plotlyjs(), "")  # plotly.js itself names URLs it never loads here
    assert "http://" not in ours and "https://" not in ours
    for call in ("fetch(", "XMLHttpRequest", "WebSocket", "sendBeacon", "EventSource"):
        assert call not in ours
    assert "default-src 'none'" in ours  # the browser refuses any request the page might make


def test_an_unfinished_run_shows_what_was_finished(runs, tmp_path):
    part = tmp_path / "part"
    shutil.copytree(runs.sweep, part)
    (part / "results.parquet").unlink()
    (part / "parts" / "mean-L002.parquet").unlink()
    manifest = json.loads((part / "manifest.json").read_text())
    manifest["status"] = "interrupted"
    (part / "manifest.json").write_text(json.dumps(manifest))
    result = hl.run_report([part], out=tmp_path / "a.html", model=False)
    assert result.unfinished == ["part"]
    data = atlas_data(result.path)
    mean = find_map(data, "part", "mean / ce")["figure"]["data"][0]["z"]
    assert mean[2] == [None] * 4 and all(v is not None for v in mean[0] + mean[1])
    full = find_map(atlas_data(runs.sweep / "atlas.html"), "sweep", "mean / ce")
    assert mean[:2] == full["figure"]["data"][0]["z"][:2]
    assert "unfinished (interrupted)" in result.path.read_text(encoding="utf-8")


def test_bad_input_gets_clear_errors(runs, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="is empty: not a headlab run directory"):
        hl.report([empty], out=tmp_path / "a.html")
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "notes.txt").write_text("hi")
    with pytest.raises(ConfigError, match=r"not a headlab run directory \(no manifest.json\)"):
        hl.report([tmp_path / "stuff"], out=tmp_path / "a.html")
    with pytest.raises(ConfigError, match="does not exist"):
        hl.report([tmp_path / "nowhere"], out=tmp_path / "a.html")
    with pytest.raises(ConfigError, match="at least one run directory"):
        hl.report([], out=tmp_path / "a.html")
    other = tmp_path / "other"
    shutil.copytree(runs.detect, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["identity"]["model_fingerprint"] = "f" * 64
    (other / "manifest.json").write_text(json.dumps(manifest))
    mine = json.loads((runs.sweep / "manifest.json").read_text())["identity"]["model_fingerprint"]
    with pytest.raises(ConfigError, match="different models") as err:
        hl.report([runs.sweep, other], out=tmp_path / "a.html")
    assert mine[:16] in str(err.value) and "f" * 16 in str(err.value)
    assert not (tmp_path / "a.html").exists()
    assert main(["report", str(empty), "--out", str(tmp_path / "b.html")]) == 2
    assert "is empty" in capsys.readouterr().err


def test_cli_report_writes_one_atlas_of_several_runs(runs, tmp_path, capsys):
    out = tmp_path / "deep" / "atlas.html"
    argv = ["report", str(runs.sweep), str(runs.detect), str(runs.sweep), "--out", str(out)]
    assert main([*argv, "--no-model", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert f"atlas: {out}" in printed and "2 runs, 3 x 4 heads" in printed
    data = atlas_data(out)
    assert {m["run"] for m in data["maps"]} == {"sweep", "detect"}
    assert data["views"] is None and "without the model" in data["model_notes"][0]


def test_every_command_with_a_run_directory_takes_report():
    import argparse

    from headlab.cli.app import COMMANDS, build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    lacking = [
        name for name in COMMANDS if name not in ("demo", "report")  # demo always writes one
        and "--report" not in sub.choices[name]._option_string_actions
    ]  # fmt: skip
    assert lacking == []


@pytest.mark.slow
def test_demo_ends_with_the_atlas_of_the_default_model(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--method", "zero", "--n", "1", "--seq-len", "9", "--quiet", "--out", str(out)]
    assert main(argv) == 0
    assert f"atlas: {out / 'atlas.html'}" in capsys.readouterr().out
    data = atlas_data(out / "atlas.html")
    assert data["model"]["n_layers"] == 30 and data["model"]["n_heads"] == 9
    views = data["views"]
    assert views["pattern_shape"] == [30, 9, 9, 9]  # the run's own 9 tokens, every head
    assert len(views["promoted"]) == 30 and all(len(row) == 9 for row in views["promoted"])
    table = pd.read_parquet(out / "results.parquet")
    z = find_map(data, "demo", "zero / ce")["figure"]["data"][0]["z"]
    assert all(z[r.layer][r.head] == r.delta for r in table.itertuples())


def test_headless_browser_names_what_is_missing(monkeypatch):
    from headlab.atlas import browser

    monkeypatch.setattr(browser, "DRIVER", "/nonexistent/chromedriver")
    assert "apt-get install -y chromium chromium-driver" in browser.missing()
    with pytest.raises(ConfigError, match=r"cannot start a headless browser: .*chromium-driver"):
        browser.headless_chromium()
