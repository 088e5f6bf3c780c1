"""The vLLM side of a Serve replica: start the async engine, map API requests to sampling.

Kept apart from app.py because Serve pickles the deployment class by value; functions it calls
are imported inside its methods, so replicas import them from the installed package.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from dromedary_ray.config import EngineConfig
from dromedary_ray.errors import ConfigError
from dromedary_ray.serve.api import ApiError, ChatRequest


def encode_chat(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Prompt token ids of a chat, ready for the assistant's turn (the model's template if any).

    A chat template is a program of the model's: it may refuse a conversation (Llama-2's raises
    unless roles alternate) or fail on one. Either way the request is what it could not take,
    so that is a 400 naming `messages`, never a 500.
    """
    try:
        if getattr(tokenizer, "chat_template", None):
            return list(tokenizer.apply_chat_template(
                messages, tokenize=True, add_generation_prompt=True, return_dict=False))
        from dromedary_ray.prompts import render_chat

        return tokenizer(render_chat(tokenizer, messages)).input_ids
    except Exception as err:
        raise ApiError(400, f"messages: the model's chat template refused them: {err}",
                       "messages", "invalid_chat") from None


def sampling_params(req: ChatRequest, max_tokens: int) -> Any:
    """vLLM's SamplingParams for a request; what vLLM refuses there is a 400, not a 500."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    try:
        return SamplingParams(
            temperature=req.temperature, top_p=req.top_p if req.temperature > 0 else 1.0,
            max_tokens=max_tokens, stop=req.stop or None, seed=req.seed,
            frequency_penalty=req.frequency_penalty, presence_penalty=req.presence_penalty,
            output_kind=RequestOutputKind.DELTA if req.stream else RequestOutputKind.FINAL_ONLY,
        )
    except Exception as err:
        raise ApiError(400, f"the sampling parameters were refused: {err}", None,
                       "invalid_sampling_params") from None


def engine_error(err: Exception) -> ApiError:
    """An exception out of AsyncLLM.generate as our error object.

    Matched by class name: the replica has vLLM imported already, and this module stays
    importable without it (vLLM's import takes ~10 s), so its tests stay fast.
    """
    names = {cls.__name__ for cls in type(err).__mro__}
    if "EngineDeadError" in names:
        return ApiError(503, "the engine of this replica has stopped; Serve is replacing the "
                             "replica, retry shortly", None, "engine_dead")
    if "VLLMClientError" in names:
        return ApiError(400, f"the engine refused the request: {err}", None, "invalid_request")
    return ApiError(500, f"generation failed: {type(err).__name__}: {err}", None, "engine_error")


async def bounded_outputs(engine: Any, prompt: Any, params: Any, req_id: str,
                          timeout_s: float) -> AsyncIterator[Any]:
    """AsyncLLM.generate's outputs until done or until `timeout_s` after the call.

    The deadline wraps each wait for the engine, not the caller's whole loop: a stream yields
    between outputs, and a timer that fired there would cancel the HTTP response, not the
    generation. On expiry the vLLM request is aborted (its KV cache freed) and ApiError(504)
    raised; any other engine failure is an ApiError too (engine_error).
    """
    if engine.errored:  # the core process is gone: say so now rather than after a timeout
        raise engine_error(engine.dead_error)
    deadline = asyncio.get_running_loop().time() + timeout_s
    outputs = engine.generate(prompt, params, req_id)
    try:
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    out = await anext(outputs)
            except StopAsyncIteration:
                return
            yield out
    except TimeoutError:
        with contextlib.suppress(Exception):  # an engine that died meanwhile holds nothing
            await engine.abort(req_id)
        raise ApiError(504, f"generation took longer than the request timeout of {timeout_s:g} s"
                            "; ask for fewer max_tokens, or retry", None, "timeout") from None
    except Exception as err:  # vLLM wraps whatever else fails in its own error classes
        raise engine_error(err) from err
    finally:
        # A caller that stops early (a client gone) closes this generator; closing vLLM's in
        # turn aborts the request in the engine.
        await outputs.aclose()


def refuse_remote_code(model_path: str) -> None:
    """Refuse a model folder whose architecture exists only as code inside it.

    Engines load with trust_remote_code=False, so such code never runs; without this check the
    refusal would surface as a vLLM traceback in a replica that never starts. Matching
    transformers' own rule: an `auto_map` whose model_type transformers does not know.
    """
    config = Path(model_path) / "config.json"
    if not config.is_file():
        return  # a hub id: vLLM and transformers apply the same rule when they fetch it
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError):
        return  # not ours to judge: the engine reports a broken config itself
    if not isinstance(data, dict) or not data.get("auto_map"):
        return
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    kind = data.get("model_type")
    if kind not in CONFIG_MAPPING_NAMES:
        raise ConfigError(f"model {model_path}: config.json names custom code (auto_map "
                          f"{sorted(data['auto_map'])}) for model_type {kind!r}, which "
                          "transformers does not know; dromedary never runs a model's own code "
                          "(trust_remote_code=False). Convert it to a supported architecture")


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
