"""Figures from tidy tables, one module per command (``plots/<command>.py``) plus the shared
layer × head heatmap (:mod:`headlab.plots.base`). Each function returns a matplotlib Figure;
nothing is shown or saved here."""

from headlab.plots.base import head_grid as head_grid
from headlab.plots.base import heatmap as heatmap
from headlab.plots.base import heatmaps as heatmaps
