"""The atlas as one HTML file: the embedded JSON (heatmap figures, notes, panels, the model's
views), plotly.js inlined once, the template and the glue script of :mod:`headlab.atlas.assets`.
"""

from __future__ import annotations

import html
import json
import math
from typing import Any

import numpy as np
import plotly.graph_objects as go

from headlab.atlas.facts import HeadMap

__all__ = ["heatmap_figure", "render", "script_json"]


def _num(x: Any) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _int(x: Any) -> int | None:
    x = float(x)
    return int(x) if math.isfinite(x) else None


def _hover(m: HeadMap, ly: int, h: int, r: Any, of: int) -> str:
    """The hover label of one cell (plotly reads ``<br>``/``<b>``; run text is escaped)."""
    value = f"{r.value:+.4g}" if m.diverging else f"{r.value:.4g}"
    lines = [f"<b>L{ly}.H{h}</b> · {html.escape(m.name)}", f"{html.escape(m.quantity)} = {value}"]
    if math.isfinite(r.lo):
        lines.append(f"95 % CI [{r.lo:+.4g}, {r.hi:+.4g}]")
    tail = []
    if math.isfinite(r.n):
        tail.append(f"n = {int(r.n)}")
    if math.isfinite(r.rank):
        tail.append(f"rank {int(r.rank)} of {of}")
    if r.text:
        tail.append(html.escape(str(r.text)))
    if tail:
        lines.append(" · ".join(tail))
    return "<br>".join(lines)


def heatmap_figure(m: HeadMap, n_layers: int, n_heads: int) -> tuple[go.Figure, int]:
    """The layer x head heatmap of ``m`` (``customdata[layer][head] = [lo, hi, n, rank, text]``,
    a precomputed hover label per cell) and the number of heads it ranks."""
    z: list[list[float | None]] = [[None] * n_heads for _ in range(n_layers)]
    custom: list[list[list[Any] | None]] = [[None] * n_heads for _ in range(n_layers)]
    hover: list[list[str]] = [[""] * n_heads for _ in range(n_layers)]
    table = m.table
    of = int(np.isfinite(table["rank"].to_numpy(dtype=float)).sum())
    for r in table.itertuples():
        ly, h = int(r.layer), int(r.head)
        if not (0 <= ly < n_layers and 0 <= h < n_heads):
            continue
        z[ly][h] = _num(r.value)
        custom[ly][h] = [_num(r.lo), _num(r.hi), _int(r.n),
                         _int(r.rank), str(r.text) if r.text else ""]  # fmt: skip
        hover[ly][h] = _hover(m, ly, h, r, of)
    values = np.asarray([v for row in z for v in row if v is not None], dtype=float)
    if m.diverging:
        lim = float(np.abs(values).max()) if values.size else 1.0
        scale = {"colorscale": "RdBu", "reversescale": True, "zmid": 0.0,
                 "zmin": -(lim or 1.0), "zmax": lim or 1.0}  # fmt: skip
    else:
        scale = {"colorscale": "Viridis"}
    fig = go.Figure(
        go.Heatmap(
            z=z, x=list(range(n_heads)), y=list(range(n_layers)), customdata=custom, text=hover,
            hovertemplate="%{text}<extra></extra>", xgap=1, ygap=1,
            colorbar={"title": {"text": html.escape(m.quantity)}}, **scale,
        )
    )  # fmt: skip
    fig.update_layout(
        height=int(min(900, max(320, 80 + 20 * n_layers))),
        xaxis={"title": {"text": "head"}, "dtick": 1 if n_heads <= 40 else None},
        yaxis={"title": {"text": "layer"}, "autorange": "reversed",
               "dtick": 1 if n_layers <= 40 else None},
    )  # fmt: skip
    return fig, of


def _clean(value: Any) -> Any:
    """``value`` with NaN/inf as None and numpy scalars as Python numbers (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def script_json(payload: dict[str, Any]) -> str:
    """``payload`` as JSON that is safe inside ``<script>``: ``<``, ``>`` and ``&`` become
    ``\\u003c``-style escapes (so no ``</script>`` or ``<!--`` can end the block early), and the
    text still parses to the same values."""
    text = json.dumps(_clean(payload), ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _template() -> dict[str, Any]:
    import plotly.io as pio

    layout = pio.templates["plotly_white"].layout.to_plotly_json()
    return json.loads(json.dumps(layout, default=str))


def render(payload: dict[str, Any], context: dict[str, Any]) -> str:
    """The page: ``context`` (title, model, runs, notes, maps, panels) through the Jinja
    template with autoescape, ``payload`` embedded as JSON, plotly.js inlined once."""
    import jinja2
    from plotly.offline import get_plotlyjs

    from headlab import __version__
    from headlab.atlas.assets import CSS, SCRIPT, TEMPLATE

    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    payload = {**payload, "template": _template()}
    return env.from_string(TEMPLATE).render(
        **context, version=__version__, css=CSS, script=SCRIPT, plotly_js=get_plotlyjs(),
        data_json=script_json(payload),
    )  # fmt: skip
