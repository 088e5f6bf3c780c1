"""The transformers backend: the fallback where vLLM is absent, and a reference for tests.

Sampling is batched (left padding). Unlike vLLM, per-request seeds are not honoured one by one:
the batch is seeded with its first request's seed, so results are reproducible for the same
batch, not across different batchings. `submit` samples its whole list at once (one batch, under
a lock when several batches are in flight) and returns finished futures.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Any

from dromedary_ray.config import EngineConfig, SamplingConfig
from dromedary_ray.engines.base import (
    Completion,
    Generation,
    done_future,
    encode_prompts,
    request_seeds,
    too_long,
)

_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16", "auto": "auto"}


class _Penalties:
    """OpenAI-style frequency/presence penalties over the tokens generated so far."""

    def __init__(self, prompt_len: int, frequency: float, presence: float):
        self.prompt_len, self.frequency, self.presence = prompt_len, frequency, presence

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        generated = input_ids[:, self.prompt_len :]
        if generated.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores).scatter_add_(
            1, generated, torch.ones_like(generated, dtype=scores.dtype)
        )
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


class HFEngine:
    def __init__(self, model_path: str, cfg: EngineConfig, seed: int = 0):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        dtype = getattr(torch, cfg.dtype) if cfg.dtype != "auto" else "auto"
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
        self.model.eval()
        self.max_model_len = cfg.max_model_len
        self.seed = seed
        self._lock = threading.Lock()  # one generate at a time on the one model

    def close(self) -> None:
        self.model = None

    def submit(
        self, prompts: list[str], sampling: SamplingConfig, seeds: list[int] | None = None
    ) -> list[Future[Generation]]:
        return [done_future(g) for g in self.generate(prompts, sampling, seeds)]

    def generate(
        self, prompts: list[str], sampling: SamplingConfig, seeds: list[int] | None = None
    ) -> list[Generation]:
        seeds = request_seeds(sampling, len(prompts), seeds)
        token_ids = encode_prompts(self.tokenizer, prompts)
        results: list[Generation | None] = [None] * len(prompts)
        todo = []
        for i, ids in enumerate(token_ids):
            reason = too_long(len(ids), sampling, self.max_model_len)
            if reason:
                results[i] = Generation(len(ids), [], reason)
            else:
                todo.append(i)
        if todo:
            with self._lock:
                outs = self._generate_batch([token_ids[i] for i in todo], sampling,
                                            seeds[todo[0]])
            for i, comps in zip(todo, outs, strict=True):
                results[i] = Generation(len(token_ids[i]), comps)
        return results  # type: ignore[return-value]

    def _generate_batch(
        self, batch: list[list[int]], sampling: SamplingConfig, seed: int
    ) -> list[list[Completion]]:
        import torch

        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        width = max(len(ids) for ids in batch)
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch])
        attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch])
        torch.manual_seed(seed)
        greedy = sampling.temperature == 0
        kwargs: dict[str, Any] = dict(
            max_new_tokens=sampling.max_new_tokens,
            do_sample=not greedy,
            num_return_sequences=sampling.n,
            repetition_penalty=sampling.repetition_penalty,
            return_dict_in_generate=True,
            output_logits=True,
            pad_token_id=pad,
        )
        if not greedy:
            kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
        if sampling.stop:
            kwargs.update(stop_strings=list(sampling.stop), tokenizer=self.tokenizer)
        if sampling.frequency_penalty or sampling.presence_penalty:
            from transformers import LogitsProcessorList

            kwargs["logits_processor"] = LogitsProcessorList(
                [_Penalties(width, sampling.frequency_penalty, sampling.presence_penalty)]
            )
        with torch.no_grad():
            out = self.model.generate(input_ids=input_ids, attention_mask=attention, **kwargs)
        new = out.sequences[:, width:]
        # Raw model log-probs (before temperature/top-p), as vLLM reports them.
        logps = torch.stack(out.logits, dim=1).float().log_softmax(-1)
        chosen = logps.gather(-1, new.unsqueeze(-1)).squeeze(-1)
        comps = [self._completion(new[r], chosen[r], sampling) for r in range(new.shape[0])]
        return [comps[i * sampling.n : (i + 1) * sampling.n] for i in range(len(batch))]

    def _completion(self, ids: Any, logps: Any, sampling: SamplingConfig) -> Completion:
        eos = self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id
        tokens = ids.tolist()
        end = len(tokens)
        for j, tok in enumerate(tokens):
            if tok == eos or (pad is not None and tok == pad and pad != eos):
                end = j
                break
        hit_eos = end < len(tokens)
        tokens = tokens[:end]
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        hit_stop = False
        for stop in sampling.stop:
            if stop in text:
                text, hit_stop = text[: text.index(stop)], True
        finished = hit_eos or hit_stop or len(tokens) < sampling.max_new_tokens
        return Completion(text, tokens, logps[:end].tolist(), "stop" if finished else "length")
