"""headlab: find which attention heads cause a behaviour, by intervening on them.

Vocabulary: ``batch`` (examples), ``pos`` (token positions), ``head`` (query heads), ``d_head``
(coordinates of one head's output — the head's "neurons"). Per-head outputs are the input of each
layer's attention output projection, viewed as ``[batch, pos, head, d_head]``. The words *target,
part, run, job, condition* are defined once in ``docs/architecture.md``.

Every public name is imported on first use (``headlab.sweep`` loads torch, pandas and the sweep
analysis then), so ``import headlab`` and ``headlab --help`` stay instant.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: public name -> the module that defines it, grouped as the documentation groups them
_EXPORTS: dict[str, str] = {
    # -- core: models, interventions, hooks, statistics, metrics, engine ---------------------
    "DEFAULT_MODEL": "headlab.models.load",
    "load_model": "headlab.models.load",
    "Family": "headlab.models",
    "Layout": "headlab.models",
    "describe": "headlab.models",
    "families": "headlab.models",
    "register_family": "headlab.models",
    "Activations": "headlab.interventions",
    "Gate": "headlab.interventions",
    "Intervention": "headlab.interventions",
    "Mean": "headlab.interventions",
    "Median": "headlab.interventions",
    "Patch": "headlab.interventions",
    "Peak": "headlab.interventions",
    "Plan": "headlab.interventions",
    "Resample": "headlab.interventions",
    "Scale": "headlab.interventions",
    "Site": "headlab.interventions",
    "Zero": "headlab.interventions",
    "HookReport": "headlab.hooks",
    "capture": "headlab.hooks",
    "intervene": "headlab.hooks",
    "record": "headlab.hooks",
    "Stats": "headlab.stats",
    "StatsConfig": "headlab.stats",
    "collect_stats": "headlab.stats",
    "Metric": "headlab.metrics",
    "Scores": "headlab.metrics",
    "get_metric": "headlab.metrics",
    "metric_names": "headlab.metrics",
    "mlm_batch": "headlab.metrics",
    "evaluate": "headlab.engine",
    "forward_logits": "headlab.engine",
    "run_plans": "headlab.engine",
    "ConfigError": "headlab.errors",
    "HeadlabError": "headlab.errors",
    "ModelNotFoundError": "headlab.errors",
    "StatsMismatchError": "headlab.errors",
    # -- data --------------------------------------------------------------------------------
    "Batch": "headlab.batch",
    "load_pairs": "headlab.data.counterfactual",
    "load_task": "headlab.data",
    "load_texts": "headlab.data",
    "make_blocks": "headlab.data",
    # -- analyses (pure computation → tidy tables) --------------------------------------------
    "attention_map": "headlab.analyses.attention.maps",
    "attention_mass_scores": "headlab.analyses.attention.mass",
    "attention_rollout": "headlab.analyses.attention.maps",
    "Faithfulness": "headlab.analyses.attention.faith",
    "plausibility_faithfulness": "headlab.analyses.attention.faith",
    "backup_heads": "headlab.analyses.cascade",
    "cascade": "headlab.analyses.cascade",
    "off_target": "headlab.analyses.cascade",
    "Comparison": "headlab.analyses.compare",
    "compare": "headlab.analyses.compare",
    "detect_heads": "headlab.analyses.detect",
    "estimate": "headlab.analyses.estimate",
    "estimate_terms": "headlab.analyses.estimate",
    "estimate_then_exact": "headlab.analyses.estimate",
    "ig_terms": "headlab.analyses.estimate",
    "per_example_estimates": "headlab.analyses.estimate",
    "CHGConfig": "headlab.analyses.gates.chg",
    "chg": "headlab.analyses.gates.chg",
    "ContrastConfig": "headlab.analyses.gates.contrast",
    "contrastive_chg": "headlab.analyses.gates.contrast",
    "L0Config": "headlab.analyses.gates.l0",
    "l0_sweep": "headlab.analyses.gates.l0",
    "prune_curves": "headlab.analyses.prune",
    "shift": "headlab.analyses.shift",
    "SteerConfig": "headlab.analyses.steer",
    "SteerResult": "headlab.analyses.steer",
    "steer": "headlab.analyses.steer",
    "GenerateConfig": "headlab.analyses.steer",
    "generate_texts": "headlab.analyses.steer",
    "rescaled": "headlab.analyses.steer",
    "pursuit_scores": "headlab.analyses.steer",
    "select_heads": "headlab.analyses.steer",
    "rank_heads": "headlab.analyses.sweep",
    "sweep": "headlab.analyses.sweep",
    "top_k": "headlab.analyses.topk",
    # -- jobs: the Python twin of every command (same run directory as the CLI) ---------------
    "report": "headlab.atlas",
    "run_attention": "headlab.jobs.attention",
    "run_cascade": "headlab.jobs.cascade",
    "run_compare": "headlab.jobs.compare",
    "run_demo": "headlab.jobs.demo",
    "run_detect": "headlab.jobs.detect",
    "run_estimate": "headlab.jobs.estimate",
    "run_gate": "headlab.jobs.gate",
    "run_l0": "headlab.jobs.l0",
    "run_prune": "headlab.jobs.prune",
    "run_report": "headlab.jobs.report",
    "run_shift": "headlab.jobs.shift",
    "run_steer": "headlab.jobs.steer",
    "run_sweep": "headlab.jobs.sweep",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'headlab' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
