"""Suite-wide settings: tiny models run fastest on one thread; the real model gets them all."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(autouse=True)
def _threads(request):
    slow = request.node.get_closest_marker("slow") is not None
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)) if slow else 1)
    yield


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole session (2 CPUs, no dashboard, no auth token written
    under the home directory); jobs given ``executor="ray"`` use it and leave it running."""
    ray = pytest.importorskip("ray", reason="Ray is the optional extra: pip install -e '.[ray]'")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_AUTH_MODE", "disabled")
        ray.init(
            address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING",
            log_to_driver=False,
        )  # fmt: skip
        yield ray
        ray.shutdown()
