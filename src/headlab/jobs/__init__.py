"""Jobs: one module per command (``jobs/<command>.py``), each with its ``run_<command>`` — the
Python twin of ``headlab <command>`` that writes the same run directory. The shared skeleton is
:mod:`headlab.jobs.base`; what every job runs on is :mod:`headlab.jobs.inputs`.

Names are imported on first use, so importing one job does not import every command.
"""

from __future__ import annotations

import importlib
from typing import Any

#: public name -> module (under headlab.jobs) that defines it
_EXPORTS = {
    "Inputs": "inputs",
    "Prepared": "inputs",
    "prepare": "inputs",
    "off_target_batches": "inputs",
    "Executor": "executors",
    "SerialExecutor": "executors",
    "RayExecutor": "executors",
    "make_executor": "executors",
    "run_sweep": "sweep",
    "SweepResult": "sweep",
    "run_demo": "demo",
    "run_estimate": "estimate",
    "EstimateResult": "estimate",
    "run_prune": "prune",
    "PruneResult": "prune",
    "run_cascade": "cascade",
    "CascadeResult": "cascade",
    "run_shift": "shift",
    "ShiftResult": "shift",
    "run_detect": "detect",
    "DetectResult": "detect",
    "run_compare": "compare",
    "CompareResult": "compare",
    "run_gate": "gate",
    "GateResult": "gate",
    "run_l0": "l0",
    "L0Result": "l0",
    "run_steer": "steer",
    "SteerRun": "steer",
    "run_attention": "attention",
    "AttentionResult": "attention",
    "run_report": "report",
    "ReportResult": "report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'headlab.jobs' has no attribute {name!r}")
    return getattr(importlib.import_module(f"headlab.jobs.{module}"), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
