"""Session-wide test setup: offline hub, CPU threads, and one Ray cluster per session."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest


@pytest.fixture(scope="session")
def ray_session():
    """Start Ray once for the whole test session (CPU, with fake GPU resources for placement)."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(
            num_cpus=8,  # logical CPUs: replicas and proxies reserve CPUs, the box has 2 real cores
            num_gpus=0,
            resources={"fake_gpu": 4},
            include_dashboard=False,
            log_to_driver=False,
            ignore_reinit_error=True,
        )
    yield ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()
