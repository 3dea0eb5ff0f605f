"""Build the atlas of some run directories and write it: :func:`build_atlas`, :func:`report`."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from headlab.atlas.facts import HeadMap, read_run
from headlab.atlas.heads import HeadViews, head_views
from headlab.atlas.panels import Panel, figure_json, run_panels
from headlab.atlas.rundirs import RunView, open_runs

__all__ = ["Atlas", "build_atlas", "report", "write_atlas"]

#: which maps come first (the first is the heatmap the page opens with)
MAP_ORDER = (
    "sweep", "estimate", "ranking sweep", "compare", "attention", "cascade", "detector",
    "CHG gate", "contrastive gate", "L0 gate", "steer sweep", "steer selection",
)  # fmt: skip


@dataclass
class Atlas:
    """Everything one atlas shows, before it becomes HTML."""

    runs: list[RunView]
    maps: list[HeadMap] = field(default_factory=list)
    notes: list[dict[str, object]] = field(default_factory=list)
    clean: dict[str, dict[str, float]] = field(default_factory=dict)
    panels: list[Panel] = field(default_factory=list)
    views: HeadViews | None = None
    model_notes: list[str] = field(default_factory=list)
    n_layers: int = 0
    n_heads: int = 0

    @property
    def title(self) -> str:
        name = str(self.runs[0].identity.get("model", "model"))
        return f"Head atlas · {Path(name).name if os.sep in name else name}"

    def html(self) -> str:
        """The self-contained page."""
        from headlab.atlas.page import heatmap_figure, render

        maps = []
        for i, m in enumerate(self.maps):
            fig, of = heatmap_figure(m, self.n_layers, self.n_heads)
            maps.append({"id": i, "run": m.run, "group": m.group, "name": m.name,
                         "quantity": m.quantity, "diverging": m.diverging, "of": of,
                         "figure": figure_json(fig)})  # fmt: skip
        notes = [[f"L{n['layer']}.H{n['head']}", f"{n['run']} · {n['group']}", n["text"],
                  n.get("tag", "")] for n in self.notes]  # fmt: skip
        model = {"n_layers": self.n_layers, "n_heads": self.n_heads,
                 "fingerprint": (self.runs[0].fingerprint or "unknown")[:16]}  # fmt: skip
        payload = {
            "model": model, "maps": maps, "notes": notes,
            "panels": [{"run": p.run, "title": p.title, "figure": figure_json(p.figure)}
                       for p in self.panels],
            "views": None if self.views is None else self.views.payload(),
            "model_notes": self.model_notes,
        }  # fmt: skip
        context = {"title": self.title, "model": model, "runs": [_overview(r, self.clean)
                   for r in self.runs], "notes": self.model_notes, "maps": maps,
                   "panels": self.panels}  # fmt: skip
        return render(payload, context)


def build_atlas(
    runs: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
    *,
    model: bool = True,
    on_status: Callable[[str], None] | None = None,
) -> Atlas:
    """Read ``runs`` (run directories of one model) into an :class:`Atlas`; with ``model`` load
    the model for attention patterns and promoted tokens (left out, with a note, if it cannot
    be loaded).

    Raises:
        ConfigError: a path that is not a run directory; runs of different models.
    """
    views = open_runs([runs] if isinstance(runs, str | os.PathLike) else list(runs))
    atlas = Atlas(views)
    for run in views:
        found = read_run(run)
        atlas.maps += found.maps
        atlas.notes += found.notes
        atlas.clean[run.label] = found.clean
        atlas.panels += run_panels(run)
    order = {g: i for i, g in enumerate(MAP_ORDER)}
    atlas.maps.sort(key=lambda m: order.get(m.group, len(order)))  # stable: runs keep their order
    if model:
        atlas.views, atlas.model_notes = head_views(views, on_status=on_status)
    else:
        atlas.model_notes = ["made without the model (--no-model): no attention patterns or "
                             "promoted tokens"]  # fmt: skip
    atlas.n_layers, atlas.n_heads = _shape(atlas)
    return atlas


def _shape(atlas: Atlas) -> tuple[int, int]:
    """``(n_layers, n_heads)``: the model's when it was loaded, else the statistics' layout, else
    the largest head any table names."""
    if atlas.views is not None and atlas.views.patterns is not None:
        return tuple(atlas.views.patterns.shape[:2])  # type: ignore[return-value]
    if atlas.views is not None and atlas.views.promoted is not None:
        return len(atlas.views.promoted), len(atlas.views.promoted[0])
    for run in atlas.runs:
        layout = _stats_layout(run)
        if layout is not None:
            return layout
    layers = [int(m.table["layer"].max()) + 1 for m in atlas.maps if len(m.table)]
    heads = [int(m.table["head"].max()) + 1 for m in atlas.maps if len(m.table)]
    layers += [int(n["layer"]) + 1 for n in atlas.notes]  # type: ignore[call-overload]
    heads += [int(n["head"]) + 1 for n in atlas.notes]  # type: ignore[call-overload]
    return max(layers, default=0), max(heads, default=0)


def _stats_header(run: RunView) -> dict[str, Any] | None:
    """The JSON header of the run's ``stats.safetensors`` (None: absent or unreadable)."""
    import json

    from safetensors import safe_open

    path = run.file("stats.safetensors")
    if path is None:
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {})["headlab"])
    except Exception:  # unreadable statistics: the atlas falls back to the tables
        return None


def _stats_layout(run: RunView) -> tuple[int, int] | None:
    header = _stats_header(run)
    try:
        return int(header["layout"]["n_layers"]), int(header["layout"]["n_heads"])  # type: ignore[index]
    except (TypeError, KeyError, ValueError):
        return None


def _shape_of(path: Path | None, key: str) -> list[int] | None:
    if path is None:
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.get_slice(key).get_shape()) if key in f.keys() else None  # noqa: SIM118
    except Exception:
        return None


def _overview(run: RunView, clean: dict[str, dict[str, float]]) -> dict[str, Any]:
    """One row of the overview table."""
    ident = run.identity
    model = f"{ident.get('model', '?')} ({ident.get('dtype', 'float32')})"
    if ident.get("task"):
        data = f"task {ident['task']}"
    elif ident.get("data"):
        data = f"corpus {ident['data']}"
    elif isinstance(ident.get("concept"), dict):
        data = f"concept {ident['concept'].get('name', '')}"
    else:
        data = f"prompt {ident['prompt']!r}" if ident.get("prompt") else ""
    if ident.get("stats_data"):
        data += f"; statistics from {ident['stats_data']}"
    sizes = []
    for name, what in (("tokens.safetensors", "evaluation"), ("prompt_tokens.safetensors",
                                                              "prompt")):  # fmt: skip
        shape = _shape_of(run.file(name), "input_ids")
        if shape:
            sizes.append(f"{what}: {' × '.join(map(str, shape))} tokens")
    header = _stats_header(run)
    if header is not None:
        sizes.append(f"statistics: {header.get('n_inputs', '?')} inputs")
    return {
        "label": run.label, "path": str(run.path), "kind": run.kind, "status": run.status,
        "complete": run.complete, "created": str(run.manifest.get("created", "")),
        "command": run.command, "model": model, "data": data, "sizes": sizes,
        "clean": {k: f"{v:.6g}" for k, v in clean.get(run.label, {}).items()},
        "notes": list(run.notes),
    }  # fmt: skip


def write_atlas(atlas: Atlas, out: str | os.PathLike[str]) -> Path:
    """Write ``atlas`` as HTML to ``out`` (a folder gets ``atlas.html``), atomically; returns the
    file's path.

    Raises:
        ConfigError: ``out`` cannot be written.
    """
    from headlab.errors import ConfigError
    from headlab.runs import atomic_path

    page = atlas.html()
    target = Path(out)
    if target.is_dir():
        target = target / "atlas.html"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(
            f"cannot create {target.parent} ({err.strerror or err}); choose a writable --out"
        ) from None
    with atomic_path(target) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return target


def report(
    runs: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
    *,
    out: str | os.PathLike[str],
    model: bool = True,
    on_status: Callable[[str], None] | None = None,
) -> Path:
    """Write the head atlas of ``runs`` (run directories of one model, any command) to ``out``:
    one self-contained HTML file that opens offline. Returns its path.

    Args:
        runs: one run directory or several of the same model.
        out: the HTML file to write (a folder gets ``atlas.html``; written atomically).
        model: load the model for attention patterns and promoted tokens.
        on_status: called with a line before slow steps.

    Raises:
        ConfigError: a path that is not a run directory; runs of different models; ``out`` not
            writable.
    """
    return write_atlas(build_atlas(runs, model=model, on_status=on_status), out)
