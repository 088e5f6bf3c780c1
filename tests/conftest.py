"""Shared fixtures. Fast tests need none of these; `slow` ones start Ray and vLLM for real."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model() -> str:
    from dromedary_ray.models import resolve_model

    return resolve_model("builtin:tiny-llama")


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray cluster on 127.0.0.1 for the whole session (start-up costs ~8 s)."""
    from dromedary_ray.config import RayConfig
    from dromedary_ray.runtime.cluster import connect, shutdown

    connect(RayConfig(num_cpus=4))
    yield
    shutdown()
