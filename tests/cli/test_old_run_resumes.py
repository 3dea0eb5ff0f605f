"""A run directory written by release 0.1.0 resumes under the current code.

``tests/fixtures/runs/sweep_v0.1.0`` is an interrupted ``headlab sweep`` run written by the 0.1.0
code (3 of its 4 parts done, no part checksums in its manifest, status ``interrupted``), and
``sweep_v0.1.0.expected.parquet`` the table that release wrote for the whole run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd

from headlab.cli.app import main

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "runs" / "sweep_v0.1.0"


def test_a_run_directory_of_release_0_1_0_resumes(tmp_path, monkeypatch):
    run = shutil.copytree(FIXTURE, tmp_path / "run")
    monkeypatch.chdir(ROOT)  # the manifest names the model by its relative path
    argv = [
        "sweep", "--model", "tests/fixtures/induction_model", "--task", "induction",
        "--seq-len", "33", "--n-blocks", "4", "--n-stats-blocks", "4", "--method", "zero,mean",
        "--out", str(run), "--quiet",
    ]  # fmt: skip
    before = {p.name: p.stat().st_mtime_ns for p in (run / "parts").glob("*.parquet")}
    assert main(argv) == 0
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["resumed"] == 1
    # the three finished parts were kept, the missing one computed
    after = {p.name: p.stat().st_mtime_ns for p in (run / "parts").glob("*.parquet")}
    assert set(after) == set(before) | {"mean-L001.parquet"}
    assert all(after[k] == v for k, v in before.items())
    got = pd.read_parquet(run / "results.parquet")
    want = pd.read_parquet(FIXTURE.parent / "sweep_v0.1.0.expected.parquet")
    pd.testing.assert_frame_equal(got[["layer", "head", "method", "metric"]],
                                  want[["layer", "head", "method", "metric"]])  # fmt: skip
    # 0.1.0 scored the clean run with another cross-entropy layout (issue 11): ≤ 1e-7 nats here
    for col in ("value", "baseline", "delta"):
        assert float((got[col] - want[col]).abs().max()) <= 1e-7, col
