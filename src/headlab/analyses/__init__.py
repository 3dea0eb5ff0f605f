"""Analyses: each returns a tidy pandas table and never prints or plots by itself."""

from headlab.analyses.attention import attention_map, attention_mass, attention_mass_scores
from headlab.analyses.attention_faith import Faithfulness, causal_effects, plausibility_faithfulness
from headlab.analyses.cascade import backup_heads, cascade, cascade_steps, off_target
from headlab.analyses.compare import Comparison, compare
from headlab.analyses.detect import attention_patterns, detect_heads, eager_attention
from headlab.analyses.estimate import estimate
from headlab.analyses.estimate_check import EstimateCheck, estimate_then_exact
from headlab.analyses.gates_chg import CHGConfig, CHGResult, chg, head_taxonomy
from headlab.analyses.gates_contrast import ContrastConfig, contrastive_chg
from headlab.analyses.gates_l0 import L0Config, L0Result, l0_sweep
from headlab.analyses.gates_validate import validate_labels
from headlab.analyses.prune import prune_curves, prune_parts, removable_fraction
from headlab.analyses.shift import conditions, shift
from headlab.analyses.steer import SteerConfig, SteerResult, steer
from headlab.analyses.steer_select import pursuit_scores, select_heads, sweep_scores
from headlab.analyses.sweep import SweepPart, effect, rank_heads, sweep, sweep_parts, tidy

__all__ = [
    "CHGConfig",
    "CHGResult",
    "Comparison",
    "ContrastConfig",
    "EstimateCheck",
    "Faithfulness",
    "L0Config",
    "L0Result",
    "SteerConfig",
    "SteerResult",
    "SweepPart",
    "attention_map",
    "attention_mass",
    "attention_mass_scores",
    "attention_patterns",
    "backup_heads",
    "cascade",
    "cascade_steps",
    "causal_effects",
    "chg",
    "compare",
    "conditions",
    "contrastive_chg",
    "detect_heads",
    "eager_attention",
    "effect",
    "estimate",
    "estimate_then_exact",
    "head_taxonomy",
    "l0_sweep",
    "off_target",
    "plausibility_faithfulness",
    "prune_curves",
    "prune_parts",
    "pursuit_scores",
    "rank_heads",
    "removable_fraction",
    "select_heads",
    "shift",
    "steer",
    "sweep",
    "sweep_parts",
    "sweep_scores",
    "tidy",
    "validate_labels",
]
