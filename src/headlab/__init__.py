"""headlab: find which attention heads cause a behaviour, by intervening on them.

Vocabulary: ``batch`` (examples), ``pos`` (token positions), ``head`` (query heads), ``d_head``
(coordinates of one head's output — the head's "neurons"). Per-head outputs are the input of each
layer's attention output projection, viewed as ``[batch, pos, head, d_head]``.
"""

from headlab.analyses.attention import attention_map, attention_mass_scores, attention_rollout
from headlab.analyses.attention_faith import Faithfulness, plausibility_faithfulness
from headlab.analyses.cascade import backup_heads, cascade, off_target
from headlab.analyses.compare import Comparison, compare
from headlab.analyses.detect import detect_heads
from headlab.analyses.estimate import estimate
from headlab.analyses.estimate_check import estimate_then_exact
from headlab.analyses.gates_chg import CHGConfig, chg
from headlab.analyses.gates_contrast import ContrastConfig, contrastive_chg
from headlab.analyses.gates_l0 import L0Config, l0_sweep
from headlab.analyses.prune import prune_curves
from headlab.analyses.shift import shift
from headlab.analyses.steer import SteerConfig, SteerResult, steer
from headlab.analyses.steer_generate import GenerateConfig, generate_texts, rescaled
from headlab.analyses.steer_select import pursuit_scores, select_heads
from headlab.analyses.sweep import rank_heads, sweep
from headlab.batch import Batch
from headlab.data import load_task, load_texts, make_blocks
from headlab.engine import evaluate, forward_logits, run_plans
from headlab.errors import ConfigError, HeadlabError, ModelNotFoundError, StatsMismatchError
from headlab.gate_jobs import run_gate
from headlab.hooks import HookReport, capture, intervene, record
from headlab.interventions import (
    Activations,
    Gate,
    Intervention,
    Mean,
    Median,
    Patch,
    Peak,
    Plan,
    Resample,
    Scale,
    Site,
    Zero,
)
from headlab.jobs import run_sweep
from headlab.l0_jobs import run_l0
from headlab.metrics import Metric, Scores, get_metric, metric_names, mlm_batch
from headlab.models import Family, Layout, describe, families, register_family
from headlab.models.load import DEFAULT_MODEL, load_model
from headlab.stats import Stats, StatsConfig, collect_stats
from headlab.steer_jobs import run_steer

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL",
    "Activations",
    "Batch",
    "CHGConfig",
    "Comparison",
    "ConfigError",
    "ContrastConfig",
    "Faithfulness",
    "Family",
    "Gate",
    "GenerateConfig",
    "HeadlabError",
    "HookReport",
    "Intervention",
    "L0Config",
    "Layout",
    "Mean",
    "Median",
    "Metric",
    "ModelNotFoundError",
    "Patch",
    "Peak",
    "Plan",
    "Resample",
    "Scale",
    "Scores",
    "Site",
    "Stats",
    "StatsConfig",
    "StatsMismatchError",
    "SteerConfig",
    "SteerResult",
    "Zero",
    "attention_map",
    "attention_mass_scores",
    "attention_rollout",
    "backup_heads",
    "capture",
    "cascade",
    "chg",
    "collect_stats",
    "compare",
    "contrastive_chg",
    "describe",
    "detect_heads",
    "estimate",
    "estimate_then_exact",
    "evaluate",
    "families",
    "forward_logits",
    "generate_texts",
    "get_metric",
    "intervene",
    "l0_sweep",
    "load_model",
    "load_task",
    "load_texts",
    "make_blocks",
    "metric_names",
    "mlm_batch",
    "off_target",
    "plausibility_faithfulness",
    "prune_curves",
    "pursuit_scores",
    "rank_heads",
    "record",
    "register_family",
    "rescaled",
    "run_gate",
    "run_l0",
    "run_plans",
    "run_steer",
    "run_sweep",
    "select_heads",
    "shift",
    "steer",
    "sweep",
]
