"""Generation engines behind one protocol: vLLM (the real one) and transformers (fallback).

`make_engine` imports the chosen backend lazily, so importing this package stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dromedary_ray.config import EngineConfig
    from dromedary_ray.engines.base import Engine


def make_engine(model_path: str, cfg: EngineConfig, seed: int = 0) -> Engine:
    if cfg.backend == "vllm":
        from dromedary_ray.engines.vllm_engine import VLLMEngine

        return VLLMEngine(model_path, cfg, seed=seed)
    from dromedary_ray.engines.hf_engine import HFEngine

    return HFEngine(model_path, cfg, seed=seed)
