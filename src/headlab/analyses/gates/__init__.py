"""Learned head gates: fit a gate on every head of a frozen model and read which heads matter.

- :mod:`~headlab.analyses.gates.core`: the machinery every gate fit shares — gating stacked masks
  (:class:`MaskGate`), the loss targets and masked NLL, the one training loop (:func:`optimise`).
- :mod:`~headlab.analyses.gates.chg`: Causal Head Gating (:func:`chg`), three fits and a head
  taxonomy (``headlab gate``).
- :mod:`~headlab.analyses.gates.taxonomy`: the CHG head taxonomy (:func:`head_taxonomy`) from
  the three fits.
- :mod:`~headlab.analyses.gates.contrast`: contrastive CHG (:func:`contrastive_chg`), heads one set
  needs and another does not (``headlab gate --forget-task/--forget-data``).
- :mod:`~headlab.analyses.gates.l0`: hard-concrete L0 gates swept over the penalty weight
  (:func:`l0_sweep`, ``headlab l0``).
- :mod:`~headlab.analyses.gates.validate`: are the labels causal? ablate labelled vs random heads.
"""

from headlab.analyses.gates.chg import FITS as FITS
from headlab.analyses.gates.chg import CHGConfig as CHGConfig
from headlab.analyses.gates.chg import CHGFitPart as CHGFitPart
from headlab.analyses.gates.chg import CHGResult as CHGResult
from headlab.analyses.gates.chg import chg as chg
from headlab.analyses.gates.chg import gate_nll as gate_nll
from headlab.analyses.gates.chg import label_fits as label_fits
from headlab.analyses.gates.contrast import ContrastConfig as ContrastConfig
from headlab.analyses.gates.contrast import ContrastPart as ContrastPart
from headlab.analyses.gates.contrast import ContrastResult as ContrastResult
from headlab.analyses.gates.contrast import check_contrast as check_contrast
from headlab.analyses.gates.contrast import contrast_table as contrast_table
from headlab.analyses.gates.contrast import contrastive_chg as contrastive_chg
from headlab.analyses.gates.core import MaskGate as MaskGate
from headlab.analyses.gates.core import Targets as Targets
from headlab.analyses.gates.core import frozen as frozen
from headlab.analyses.gates.core import gate_metric as gate_metric
from headlab.analyses.gates.core import gate_plan as gate_plan
from headlab.analyses.gates.core import loss_targets as loss_targets
from headlab.analyses.gates.core import masked_nll as masked_nll
from headlab.analyses.gates.core import optimise as optimise
from headlab.analyses.gates.l0 import L0Config as L0Config
from headlab.analyses.gates.l0 import L0FitPart as L0FitPart
from headlab.analyses.gates.l0 import L0SweepResult as L0SweepResult
from headlab.analyses.gates.l0 import check_l0_lambdas as check_l0_lambdas
from headlab.analyses.gates.l0 import l0_evaluate as l0_evaluate
from headlab.analyses.gates.l0 import l0_sweep as l0_sweep
from headlab.analyses.gates.taxonomy import head_taxonomy as head_taxonomy
from headlab.analyses.gates.validate import ablate_groups as ablate_groups
from headlab.analyses.gates.validate import label_groups as label_groups
from headlab.analyses.gates.validate import validate_contrast as validate_contrast
from headlab.analyses.gates.validate import validate_labels as validate_labels
from headlab.analyses.gates.validate import validation_summary as validation_summary

__all__ = [
    "FITS",
    "CHGConfig",
    "CHGFitPart",
    "CHGResult",
    "ContrastConfig",
    "ContrastPart",
    "ContrastResult",
    "L0Config",
    "L0FitPart",
    "L0SweepResult",
    "MaskGate",
    "Targets",
    "ablate_groups",
    "check_contrast",
    "check_l0_lambdas",
    "chg",
    "contrast_table",
    "contrastive_chg",
    "frozen",
    "gate_metric",
    "gate_nll",
    "gate_plan",
    "head_taxonomy",
    "l0_evaluate",
    "l0_sweep",
    "label_fits",
    "label_groups",
    "loss_targets",
    "masked_nll",
    "optimise",
    "validate_contrast",
    "validate_labels",
    "validation_summary",
]
