"""Interventions: small immutable values that say what to do to which heads.

A :class:`Site` picks heads of one layer, optionally only some of their neurons (coordinates of
``d_head``) and only some positions. An :class:`Intervention` says what the selected activations
become. A :class:`Plan` pairs sites with interventions; different heads may get different
interventions in one forward, but no coordinate may be claimed twice.

Every intervention is pure: :meth:`Intervention.apply` takes the selected activations
``x: [batch, pos, head, neuron]`` and returns a new tensor of the same shape. Interventions that
need activation statistics (mean, median, peak, resample) read them from a :class:`StatsSource`,
which :func:`headlab.intervene` passes in.

- :mod:`~headlab.interventions.base`: the :class:`Intervention` base class, the
  :class:`Selection` and :class:`StatsSource` it receives, the example offset
  (:func:`example_offset`).
- :mod:`~headlab.interventions.values`: the interventions (``Zero`` ... ``Gate``),
  :class:`Activations`, :func:`intervention_from_name`.
- :mod:`~headlab.interventions.plan`: :class:`Site` and :class:`Plan`.
- :mod:`~headlab.interventions.apply`: a plan applied to one layer's head outputs (what the hooks
  call).
"""

from headlab.interventions.base import Intervention as Intervention
from headlab.interventions.base import Selection as Selection
from headlab.interventions.base import StatsSource as StatsSource
from headlab.interventions.base import current_offset as current_offset
from headlab.interventions.base import example_offset as example_offset
from headlab.interventions.plan import Plan as Plan
from headlab.interventions.plan import Site as Site
from headlab.interventions.values import Activations as Activations
from headlab.interventions.values import Gate as Gate
from headlab.interventions.values import Mean as Mean
from headlab.interventions.values import Median as Median
from headlab.interventions.values import Patch as Patch
from headlab.interventions.values import Peak as Peak
from headlab.interventions.values import Resample as Resample
from headlab.interventions.values import Scale as Scale
from headlab.interventions.values import Zero as Zero
from headlab.interventions.values import intervention_from_name as intervention_from_name

__all__ = [
    "Activations",
    "Gate",
    "Intervention",
    "Mean",
    "Median",
    "Patch",
    "Peak",
    "Plan",
    "Resample",
    "Scale",
    "Selection",
    "Site",
    "StatsSource",
    "Zero",
    "example_offset",
    "intervention_from_name",
]
