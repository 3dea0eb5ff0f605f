"""scripts/findings.py: fenced blocks are rewritten, prose is kept, missing runs render nothing."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd

SCRIPT = Path(__file__).parents[2] / "scripts" / "findings.py"


def _module():
    spec = importlib.util.spec_from_file_location("findings_script", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_update_doc_rewrites_only_the_fenced_blocks():
    f = _module()
    text = (
        "intro\n<!-- auto:a -->\nold a\n<!-- /auto:a -->\nprose\n"
        "<!-- auto:b -->\nold\n<!-- /auto:b -->\n"
    )
    out, done = f.update_doc(text, {"a": "new a\nline 2", "c": "unused"})
    assert done == ["a"]
    assert out == (
        "intro\n<!-- auto:a -->\nnew a\nline 2\n<!-- /auto:a -->\nprose\n"
        "<!-- auto:b -->\nold\n<!-- /auto:b -->\n"
    )


def test_renderers_skip_missing_runs_and_compute_verdicts(tmp_path, monkeypatch):
    f = _module()
    monkeypatch.setattr(f, "RUNS", tmp_path)
    assert all(render() is None for render in f.RENDERERS.values())
    # a sweep with 3 of 10 heads carrying all the effect: concentrated, steep tail
    run = tmp_path / "sweep-docs"
    run.mkdir()
    (run / "manifest.json").write_text('{"command": ["headlab", "sweep", "--out", "x"]}')
    deltas = [2.0, 1.0, 0.5] + [0.001] * 7
    pd.DataFrame({"layer": range(10), "head": 0, "method": "zero", "metric": "ce",
                  "delta": deltas}).to_parquet(run / "results.parquet")  # fmt: skip
    text = f.render_sweep()
    assert "of 10 heads, 7 (70%) change CE by less than 0.01" in text
    assert "--out runs/findings/sweep-docs" in text and "**agrees**" in text
