"""The README's Python example works as written, on the real default model."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_readme_python_example_runs(capsys):
    text = (Path(__file__).parents[2] / "README.md").read_text()
    block = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    assert len(block.strip().splitlines()) <= 12
    scope: dict[str, object] = {}
    exec(compile(block, "README.md", "exec"), scope)
    table = scope["table"]
    assert len(table) == 4 and set(table["method"]) == {"zero", "peak"}
    ce = float(capsys.readouterr().out.splitlines()[0])
    assert 1.5 < ce < 8.0


def test_readme_rescaled_generation_example_runs():
    text = (Path(__file__).parents[2] / "README.md").read_text()
    first, second = re.findall(r"```python\n(.*?)```", text, re.S)[:2]
    scope: dict[str, object] = {}
    exec(compile("\n".join(first.splitlines()[:3]), "README.md", "exec"), scope)  # load_model
    exec(compile(second, "README.md", "exec"), scope)
    enc, out = scope["enc"], scope["out"]
    assert out.shape == (1, enc["input_ids"].shape[1] + 20)
    plain = scope["model"].generate(**enc, max_new_tokens=20, do_sample=False)
    assert not (out == plain).all()  # flipping two late heads changes the greedy continuation
