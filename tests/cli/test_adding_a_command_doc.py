"""docs/adding-a-command.md's worked template runs: its four modules, written out under a
scratch package, make a working command whose table matches an independent weight-edit oracle."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pandas as pd
import torch
from oracles import edited

import headlab as hl
from headlab.runs import RunDir

DOC = Path(__file__).resolve().parents[2] / "docs" / "adding-a-command.md"
MODULES = {  # the doc's section heading -> the scratch module it becomes
    "analyses/pairs.py": "pairs_analyses",
    "plots/pairs.py": "pairs_plots",
    "jobs/pairs.py": "pairs_jobs",
    "cli/pairs.py": "pairs_cli",
}


def _write_template(folder: Path) -> None:
    text = DOC.read_text()
    for heading, name in MODULES.items():
        section = text.split(f"`{heading}`", 1)[1]
        code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
        for other, target in MODULES.items():
            dotted = "headlab." + other.removesuffix(".py").replace("/", ".")
            code = code.replace(dotted, target)
        (folder / f"{name}.py").write_text(code)


def test_the_documented_command_runs_and_is_exact(tiny_folder, tmp_path, monkeypatch, capsys):
    _write_template(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in MODULES.values():
        sys.modules.pop(name, None)
    import argparse

    import pairs_cli

    parser = argparse.ArgumentParser(prog=f"headlab {pairs_cli.NAME}")
    pairs_cli.add_arguments(parser)
    out = tmp_path / "run"
    args = parser.parse_args(["--model", tiny_folder, "--seq-len", "16", "--n-blocks", "2",
                              "--n-stats-blocks", "2", "--out", str(out), "--quiet"])  # fmt: skip
    assert pairs_cli.run(args) == 0
    assert "run directory" in capsys.readouterr().out
    table = pd.read_parquet(out / "results.parquet")
    model, _ = hl.load_model(tiny_folder)
    layout = hl.describe(model)
    n = layout.n_heads
    assert len(table) == layout.n_layers * n * (n - 1) // 2
    # one pair against an independent oracle: both heads' columns of W_O zeroed
    batch = RunDir(out, {}).load_tokens()
    row = table[(table["layer"] == 1) & (table["head"] == 0) & (table["other"] == 1)].iloc[0]
    oracle = edited(model, [(1, 0, "zero", None), (1, 1, "zero", None)])
    with torch.no_grad():
        want = hl.evaluate(oracle, batch, ["ce"])["ce"].mean
    assert abs(float(row["value"]) - want) <= 1e-5 * want
