"""The vLLM side of a Serve replica: start the async engine, map API requests to sampling.

Kept apart from app.py because Serve pickles the deployment class by value; functions it calls
are imported inside its methods, so replicas import them from the installed package.
"""

from __future__ import annotations

import os
from typing import Any

from dromedary_ray.config import EngineConfig
from dromedary_ray.serve.api import ChatRequest


def encode_chat(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Prompt token ids of a chat, ready for the assistant's turn (the model's template if any)."""
    if getattr(tokenizer, "chat_template", None):
        return list(tokenizer.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=True, return_dict=False))
    from dromedary_ray.prompts import render_chat

    return tokenizer(render_chat(tokenizer, messages)).input_ids


def sampling_params(req: ChatRequest, max_tokens: int) -> Any:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(
        temperature=req.temperature, top_p=req.top_p if req.temperature > 0 else 1.0,
        max_tokens=max_tokens, stop=req.stop or None, seed=req.seed,
        frequency_penalty=req.frequency_penalty, presence_penalty=req.presence_penalty,
        output_kind=RequestOutputKind.DELTA if req.stream else RequestOutputKind.FINAL_ONLY,
    )


def start_engine(model_path: str, cfg: EngineConfig) -> tuple[Any, Any]:
    from dromedary_ray.engines.vllm_engine import prepare_vllm_env

    on_cpu = prepare_vllm_env(cfg)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"  # AsyncLLM serves from a core process
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    args = AsyncEngineArgs(
        model=model_path, dtype=cfg.dtype, max_model_len=cfg.max_model_len,
        tensor_parallel_size=cfg.tensor_parallel_size, enforce_eager=cfg.enforce_eager,
        enable_prefix_caching=cfg.enable_prefix_caching, trust_remote_code=False,
        disable_log_stats=True,
    )
    if not on_cpu:
        args.gpu_memory_utilization = cfg.gpu_memory_utilization
    engine = AsyncLLM.from_engine_args(args)
    from transformers import AutoTokenizer

    return engine, AutoTokenizer.from_pretrained(model_path)
