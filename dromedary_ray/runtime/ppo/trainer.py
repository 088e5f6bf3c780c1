"""The PPO trainer actor: policy, critic and frozen reference in one process, plain PyTorch.

- policy: the SFT model (`AutoModelForCausalLM`), trained with the clipped surrogate.
- critic: a policy-shaped backbone with a scalar head (`AutoModelForSequenceClassification`,
  one label), started from the reward model (SALMON, as AlpacaFarm: the RM already reads
  responses) or from the policy with a zero head; per-token values come from the head applied
  at every position (`forward.TokenValues`). Absent for the critic-free advantages (rloo, group).
- reference: a frozen copy of the SFT model, for the KL penalty; with `ppo.lora` the policy's
  own base with its adapter switched off (no second copy).

All three are fp32 (AdamW on bf16 weights loses small updates). The batch, the forward passes
and the losses are `forward.py`'s, shared with the DeepSpeed ZeRO-3 trainer group
(`ds_trainer.py`, `ppo.trainer: deepspeed`) that models too large for one process need.
"""

from __future__ import annotations

import copy
import os
import random
import shutil
from collections import defaultdict
from typing import Any

import pyarrow as pa

from dromedary_ray.algos.ppo import minibatches, unpad
from dromedary_ray.config import EngineConfig, PPOConfig
from dromedary_ray.errors import DromedaryError
from dromedary_ray.runtime.ppo.forward import (
    ADAMW_WEIGHT_DECAY,
    Batch,
    TokenValues,
    build_batch,
    policy_terms,
    row_columns,
    token_logprobs,
    token_values,
    value_terms,
)
from dromedary_ray.runtime.ppo.rollout import WeightsUpdate

STATE_FILE = "trainer.pt"


class PPOTrainer:
    def __init__(self, policy_path: str, cfg: PPOConfig, value_init_path: str | None = None, *,
                 engine: EngineConfig, sync_dir: str | None = None):
        """On a GPU when the engines use GPUs, with an engine's share of CPU threads.
        `sync_dir`: where LoRA adapters are written for the engines (`ppo.lora` only)."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(max(1, int(engine.cpus_per_engine)))  # Ray does not pin threads
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        self.cfg, self.sync_dir = cfg, sync_dir
        use_gpu = engine.gpus_per_engine > 0 and torch.cuda.is_available()
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.temperature = cfg.sampling.temperature
        self.tokenizer = AutoTokenizer.from_pretrained(policy_path)
        self.pad_id = self.tokenizer.pad_token_id or self.tokenizer.eos_token_id or 0

        def causal_lm() -> Any:
            model = AutoModelForCausalLM.from_pretrained(policy_path, dtype=torch.float32)
            model.config.use_cache = False
            return model.to(self.device).eval()  # eval: no dropout in PPO's ratios

        self.policy = with_adapter(causal_lm(), cfg, "causal_lm")
        self.ref = None if cfg.lora else causal_lm().requires_grad_(False)
        self.critic = (TokenValues(with_adapter(_load_critic(policy_path, value_init_path,
                                                             self.policy.config), cfg, "score"))
                       .to(self.device).eval() if cfg.advantage == "gae" else None)
        self.policy_opt = _adamw(self.policy, cfg.learning_rate)
        self.value_opt = (_adamw(self.critic, cfg.value_learning_rate)
                          if self.critic is not None else None)

    # --- forward passes over rollouts ---------------------------------------------------------

    def _no_grad_pass(self, rollouts: pa.Table, fn: Any) -> list[list[float]]:
        import torch

        b = build_batch(rollouts, self.pad_id)
        size = self.cfg.mini_batch_size
        chunks = []
        with torch.no_grad():
            for start in range(0, len(b.lengths), size):
                chunks.append(fn(b, list(range(start, min(start + size, len(b.lengths))))).cpu())
        width = b.mask.shape[1]
        padded = torch.cat([torch.nn.functional.pad(c, (0, width - c.shape[1])) for c in chunks])
        return unpad(padded, b.lengths)

    def _logprobs(self, model: Any, b: Batch, idx: list[int]) -> Any:
        return token_logprobs(model, b, idx, self.device, self.temperature)[0]

    def policy_logprobs(self, rollouts: pa.Table) -> list[list[float]]:
        """Each response token's log-prob under the current policy (PPO's "old" policy)."""
        return self._no_grad_pass(rollouts, lambda b, i: self._logprobs(self.policy, b, i))

    def ref_logprobs(self, rollouts: pa.Table) -> list[list[float]]:
        """Each response token's log-prob under the frozen reference (the SFT model)."""
        if self.ref is not None:
            return self._no_grad_pass(rollouts, lambda b, i: self._logprobs(self.ref, b, i))
        with self.policy.disable_adapter():  # LoRA: the base is the SFT model
            return self._no_grad_pass(rollouts, lambda b, i: self._logprobs(self.policy, b, i))

    def values(self, rollouts: pa.Table) -> list[list[float]]:
        """The critic's value of the state before each response token."""
        if self.critic is None:
            raise DromedaryError(f"advantage {self.cfg.advantage} runs without a critic")
        return self._no_grad_pass(rollouts,
                                  lambda b, i: token_values(self.critic, b, i, self.device))

    # --- the update ---------------------------------------------------------------------------

    def update(self, rollouts: pa.Table, step: int) -> dict[str, float]:
        """`ppo_epochs` passes over the rollouts in shuffled minibatches; mean metrics.

        Reads `policy_logprobs` (old), `advantages`, and for the critic `values` (old) and
        `returns` from the rows.
        """
        b = build_batch(rollouts, self.pad_id)
        col = row_columns(rollouts, b, self.critic is not None)
        stats: dict[str, list[float]] = defaultdict(list)
        for epoch in range(self.cfg.ppo_epochs):
            for idx in minibatches(len(b.lengths), self.cfg.mini_batch_size, self.cfg.seed,
                                   step, epoch):
                for k, v in self._policy_step(b, idx, col).items():
                    stats[k].append(v)
                if self.critic is not None:
                    for k, v in self._value_step(b, idx, col).items():
                        stats[k].append(v)
        return {k: sum(v) / len(v) for k, v in stats.items()}

    def _policy_step(self, b: Batch, idx: list[int], col: dict[str, Any]) -> dict[str, float]:
        loss, terms = policy_terms(self.policy, b, idx, col, self.cfg.clip_eps, self.device,
                                   self.temperature)
        loss.backward()
        norm = self._step(self.policy, self.policy_opt)
        loss_v, clip, kl, entropy = terms.tolist()
        return {"policy_loss": loss_v, "clip_fraction": clip, "approx_kl": kl,
                "entropy": entropy, "policy_grad_norm": norm}

    def _value_step(self, b: Batch, idx: list[int], col: dict[str, Any]) -> dict[str, float]:
        loss, terms = value_terms(self.critic, b, idx, col, self.cfg.value_clip_eps, self.device)
        loss.backward()
        norm = self._step(self.critic, self.value_opt)
        loss_v, clip = terms.tolist()
        return {"value_loss": loss_v, "value_clip_fraction": clip, "value_grad_norm": norm}

    def _step(self, model: Any, opt: Any) -> float:
        import torch

        limit = self.cfg.max_grad_norm or float("inf")  # 0: report the norm, clip nothing
        trainable = [p for p in model.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(trainable, limit)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(norm)

    # --- weights out, checkpoints -------------------------------------------------------------

    def weights_for_sync(self, version: int) -> WeightsUpdate:
        """The policy for `RolloutActor.update_weights`: full weights by HF name on CPU, or
        with LoRA the adapter, saved under `sync_dir/adapter-<version>`."""
        if self.cfg.lora:
            folder = save_adapter(self.policy, self.sync_dir, version)
            return WeightsUpdate(version, adapter=folder)
        tensors = {k: v.detach().to("cpu", copy=True) for k, v in self.policy.state_dict().items()}
        return WeightsUpdate(version, tensors=tensors)

    def save(self, folder: str) -> None:
        """Policy, critic, both optimizers and the RNG states into `folder/trainer.pt`."""
        import torch

        state = {
            "policy": self.policy.state_dict(), "policy_opt": self.policy_opt.state_dict(),
            "critic": self.critic.state_dict() if self.critic is not None else None,
            "value_opt": self.value_opt.state_dict() if self.value_opt is not None else None,
            "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
        }
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f"{STATE_FILE}.tmp-{os.getpid()}")
        torch.save(state, tmp)
        os.replace(tmp, os.path.join(folder, STATE_FILE))

    def load(self, folder: str) -> None:
        import torch

        # weights_only: tensors, numbers and containers only, so a tampered checkpoint cannot
        # run code on load (RNG states and optimizer states are all of those).
        state = torch.load(os.path.join(folder, STATE_FILE), map_location=self.device,
                           weights_only=True)
        self.policy.load_state_dict(state["policy"])
        self.policy_opt.load_state_dict(state["policy_opt"])
        if self.critic is not None:
            if state["critic"] is None:
                raise DromedaryError(f"{folder} holds no critic; it was saved by a critic-free run")
            self.critic.load_state_dict(state["critic"])
            self.value_opt.load_state_dict(state["value_opt"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])

    def save_pretrained(self, out_dir: str) -> str:
        """The policy as a Hugging Face folder (LoRA merged into plain weights, which vLLM and
        transformers load without peft), written beside and renamed into place."""
        tmp = f"{out_dir}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        model = copy.deepcopy(self.policy).merge_and_unload() if self.cfg.lora else self.policy
        model.config.use_cache = True  # off for training; generation wants it
        model.save_pretrained(tmp, safe_serialization=True)
        model.config.use_cache = False
        self.tokenizer.save_pretrained(tmp)
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
        return out_dir

    def health(self) -> dict[str, Any]:
        return {"device": str(self.device), "critic": self.critic is not None,
                "pid": os.getpid()}


def with_adapter(model: Any, cfg: PPOConfig, head: str) -> Any:
    """`model` with a fresh peft LoRA adapter when `ppo.lora` is set (its base frozen), else
    `model`. The peft config comes from `train_common.lora_config`, as for fine-tuning; a score
    head is new, so it trains whole beside the adapter."""
    if cfg.lora is None:
        return model
    from peft import get_peft_model

    from dromedary_ray.runtime.train_common import lora_config

    return get_peft_model(model, lora_config(cfg.train_config(EngineConfig()), head))


def save_adapter(policy: Any, sync_dir: str | None, version: int) -> str:
    """Write the policy's adapter to `sync_dir/adapter-<version>` (aside, then renamed) and
    drop older ones; the path."""
    from dromedary_ray.runtime.ppo.forward import drop_older_versions

    if sync_dir is None:
        raise DromedaryError("ppo.lora needs a sync_dir to hand adapters to the engines")
    folder = os.path.join(sync_dir, f"adapter-{version:06d}")
    tmp = f"{folder}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    policy.save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    drop_older_versions(sync_dir, "adapter-", folder)
    return folder


def _adamw(model: Any, lr: float) -> Any:
    import torch

    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                             weight_decay=ADAMW_WEIGHT_DECAY)


def _load_critic(policy_path: str, value_init_path: str | None, policy_config: Any) -> Any:
    """The critic: the reward model's weights, or the policy's backbone with a zero head."""
    import torch
    from transformers import AutoModelForSequenceClassification

    if value_init_path is None:
        critic = AutoModelForSequenceClassification.from_pretrained(
            policy_path, num_labels=1, dtype=torch.float32)
        torch.nn.init.zeros_(critic.score.weight)  # start at V = 0, not at a random guess
        if getattr(critic.score, "bias", None) is not None:
            torch.nn.init.zeros_(critic.score.bias)
    else:
        critic = AutoModelForSequenceClassification.from_pretrained(value_init_path,
                                                                    dtype=torch.float32)
        if critic.config.vocab_size != policy_config.vocab_size:
            raise DromedaryError(
                f"the critic would start from {value_init_path}, whose vocabulary "
                f"({critic.config.vocab_size}) differs from the policy's "
                f"({policy_config.vocab_size}); set ppo.value_init=policy")
    if critic.config.num_labels != 1 or not hasattr(critic, "score"):
        raise DromedaryError("the critic needs a one-label decoder classifier with a `score` "
                             f"head; got {type(critic).__name__}")
    critic.config.use_cache = False
    return critic
