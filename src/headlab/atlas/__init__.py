"""The head atlas: one offline, interactive HTML file of everything some run directories of one
model hold about its heads (``headlab report``).

- :mod:`~headlab.atlas.rundirs`: run directories read-only (:class:`RunView`), checked to be runs
  of one model (:func:`open_runs`); an unfinished run shows its finished parts.
- :mod:`~headlab.atlas.facts`: per kind of run, its layer x head quantities (:class:`HeadMap`:
  heatmaps and card rows, with 95 % intervals where the run has them) and notes about heads.
- :mod:`~headlab.atlas.panels`: the analysis panels (pruning curves, cascade, shift, compare,
  steering, attention vs effect, gate and L0 trade-offs) as plotly figures.
- :mod:`~headlab.atlas.heads`: what needs the model: attention patterns on one example of the
  runs' tokens, and the tokens each head's mean output promotes and suppresses.
- :mod:`~headlab.atlas.page` and :mod:`~headlab.atlas.assets`: the HTML (Jinja with autoescape,
  the data as escaped JSON, plotly.js inlined once, a small glue script).
- :mod:`~headlab.atlas.build`: :func:`build_atlas`, :func:`write_atlas`, and :func:`report`
  (both in one call).
"""

from headlab.atlas.build import Atlas as Atlas
from headlab.atlas.build import build_atlas as build_atlas
from headlab.atlas.build import report as report
from headlab.atlas.build import write_atlas as write_atlas
from headlab.atlas.facts import HeadMap as HeadMap
from headlab.atlas.rundirs import RunView as RunView
from headlab.atlas.rundirs import open_runs as open_runs

__all__ = ["Atlas", "HeadMap", "RunView", "build_atlas", "open_runs", "report", "write_atlas"]
