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


@pytest.fixture(scope="session")
def tiny_dromedary_run(tmp_path_factory):
    """One plain `dromedary run` of the tiny `dromedary` recipe (tiny_run.tiny_dromedary), made
    once: test_recipe checks it and reruns it, test_autoscale compares a Ray job's outputs to it
    (~5 min saved per extra user)."""
    from tiny_run import dromedary, tiny_dromedary

    from dromedary_ray.config import PROJECT_ROOT

    run = tmp_path_factory.mktemp("tiny_dromedary") / "run"
    out = dromedary("run", str(PROJECT_ROOT / "configs/local.yaml"), "--run-dir", str(run),
                    *tiny_dromedary())
    return run, out


@pytest.fixture(scope="session")
def tiny_reward_model(tiny_model, tmp_path_factory) -> str:
    """A one-label LlamaForSequenceClassification on the tiny model, random score head: what
    the reward_model stage writes, in shape."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path_factory.mktemp("tiny_rm")
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1,
                                                               dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model.config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
    torch.nn.init.normal_(model.score.weight, std=0.5)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)
