"""The layers of docs/architecture.md, enforced: a module imports only its own layer and the
layers below it (function-level imports included), analyses neither plot, write run directories
nor print, and the command line stays light at import time."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "headlab"

#: (module prefix, layer): the longest matching prefix decides; lower numbers are lower layers
LAYERS = [
    ("headlab.errors", 0),
    ("headlab.defaults", 0),
    ("headlab.memory", 0),
    ("headlab.models", 1),
    ("headlab.batch", 1),
    ("headlab.interventions", 2),
    ("headlab.hooks", 3),
    ("headlab.stats", 4),
    ("headlab.data", 4),
    ("headlab.metrics", 4),
    ("headlab.heads", 4),
    ("headlab.engine", 5),
    ("headlab.parts", 5),
    ("headlab.analyses", 6),
    ("headlab.plots", 7),
    ("headlab.runs", 7),
    ("headlab.atlas", 7),
    ("headlab.jobs", 8),
    ("headlab.cli", 9),
]
NAMES = {0: "errors", 1: "models", 2: "interventions", 3: "hooks", 4: "stats/data/metrics",
         5: "engine", 6: "analyses", 7: "plots/runs/atlas", 8: "jobs", 9: "cli"}  # fmt: skip


def layer_of(module: str) -> int | None:
    best = None
    for prefix, layer in LAYERS:
        if (module == prefix or module.startswith(prefix + ".")) and (
            best is None or len(prefix) > len(best[0])
        ):
            best = (prefix, layer)
    return None if best is None else best[1]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports(path: Path) -> list[tuple[str, int]]:
    """Every module ``path`` imports (absolute names), with its line."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((a.name, node.lineno) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = package.split(".")
                pkg = pkg[: len(pkg) - node.level + 1]
                base = ".".join([*pkg, base]) if base else ".".join(pkg)
            out.append((base, node.lineno))
            # `from headlab import jobs` / `from headlab.analyses import gates`: the submodule
            out.extend((f"{base}.{a.name}", node.lineno) for a in node.names)
    return out


MODULES = sorted(p for p in SRC.rglob("*.py") if module_name(p) != "headlab")


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_no_module_imports_a_higher_layer(path):
    here = layer_of(module_name(path))
    assert here is not None, f"{module_name(path)} belongs to no layer: add it to LAYERS"
    bad = []
    for name, line in imports(path):
        there = layer_of(name)
        if there is not None and there > here:
            bad.append(f"line {line}: {name} ({NAMES[there]}) from {NAMES[here]}")
    assert not bad, f"{module_name(path)} imports a higher layer:\n" + "\n".join(bad)


ANALYSES = [p for p in MODULES if module_name(p).startswith("headlab.analyses")]


@pytest.mark.parametrize("path", ANALYSES, ids=lambda p: module_name(p))
def test_analyses_do_not_plot_write_runs_or_print(path):
    bad = [
        f"line {line}: imports {name}"
        for name, line in imports(path)
        if name.split(".")[0] == "matplotlib" or name.startswith(("headlab.runs", "headlab.plots"))
    ]
    tree = ast.parse(path.read_text())
    bad += [
        f"line {n.lineno}: print()"
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "print"
    ]
    assert not bad, f"{module_name(path)}:\n" + "\n".join(bad)


def test_the_layer_rule_catches_a_violation(tmp_path):
    """The checker itself: an analysis importing the run directory module is caught."""
    fake = SRC / "analyses" / "_layer_probe.py"
    fake.write_text("def f():\n    from headlab.runs import RunDir\n    return RunDir\n")
    try:
        found = [n for n, _ in imports(fake)]
        assert "headlab.runs" in found
        assert layer_of("headlab.runs") > layer_of(module_name(fake))
    finally:
        fake.unlink()


def test_command_line_help_imports_no_heavy_library():
    """``headlab --help`` (every command's parser built) imports neither torch, pandas,
    matplotlib nor transformers."""
    code = (
        "import sys\n"
        "from headlab.cli.app import build_parser\n"
        "build_parser()\n"
        "heavy = [m for m in ('torch', 'pandas', 'matplotlib', 'transformers', 'numpy', 'ray') "
        "if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "", f"building the CLI parser imported {out}"
