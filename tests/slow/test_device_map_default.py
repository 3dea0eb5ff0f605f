"""The embedded default model split over the CPU and the disk gives the numbers of the unsplit
model (slow: the real SmolLM2-135M, half of it read from disk at every forward)."""

from __future__ import annotations

import pytest
import torch

import headlab as hl
from headlab.engine import forward_logits, run_plans
from headlab.models.load import load_model

pytestmark = pytest.mark.slow


def test_default_model_on_cpu_and_disk_equals_unsplit(tmp_path):
    plain, tok = load_model("smollm2-135m")
    size = sum(p.numel() * p.element_size() for p in plain.parameters())
    split, _ = load_model(
        "smollm2-135m", device_map="sequential", max_memory={"cpu": size // 2},
        offload_folder=tmp_path / "offload",
    )  # fmt: skip
    assert {"cpu", "disk"} <= set(split.hf_device_map.values())
    ids = tok(["def add(x, y):\n    return x + y\n"], return_tensors="pt").input_ids
    batch = hl.Batch(input_ids=ids)
    assert torch.equal(forward_logits(split, batch), forward_logits(plain, batch))
    plans = [hl.Plan.of({(ly, 3): hl.Zero()}) for ly in (2, 17, 29)]
    for got, want in zip(
        run_plans(split, batch, plans, ["ce"]), run_plans(plain, batch, plans, ["ce"]), strict=True
    ):
        torch.testing.assert_close(
            got["ce"].per_token, want["ce"].per_token, rtol=0, atol=0, equal_nan=True
        )
