"""A short, bounded version of benchmarks/soak.py: 32 concurrent clients for a minute against a
real Serve replica of the tiny model, a third of the requests bad. No good request fails, no
bad one gets a 5xx, the replica is never restarted and its memory stays flat."""

import asyncio
import importlib.util
import sys

import pytest

from dromedary_ray.config import PROJECT_ROOT

pytestmark = pytest.mark.slow


def load_soak():
    spec = importlib.util.spec_from_file_location("soak", PROJECT_ROOT / "benchmarks/soak.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["soak"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_one_minute_at_32_clients(ray_local, tiny_model):
    from ray import serve

    soak = load_soak()
    url = soak.start_server(tiny_model)
    try:
        # 45 s of warm-up: the first ~40 s under a new load fill vLLM's and Python's pools
        # (+120 MiB measured); a leak shows as growth after that.
        out = asyncio.run(soak.soak(url, seconds=60, clients=32, warmup_s=45))
    finally:
        serve.shutdown()
    print(out)
    assert out["good_requests"] >= 50 and out["bad_requests"] >= 20, out
    assert soak.verdict(out, rss_growth_mib=64.0) == [], out
