"""The PPO trainer actor: policy, critic and frozen reference in one process, plain PyTorch.

- policy: the SFT model (`AutoModelForCausalLM`), trained with the clipped surrogate.
- critic: a policy-shaped backbone with a scalar head (`AutoModelForSequenceClassification`,
  one label), started from the reward model (SALMON, as AlpacaFarm: the RM already reads
  responses) or from the policy with a zero head; per-token values come from the head applied
  at every position. Absent for the critic-free advantages (rloo, group).
- reference: a frozen copy of the SFT model, for the KL penalty.

All three are fp32 (AdamW on bf16 weights loses small updates). Sequences are prompt + response
right-padded; the logits at position len(prompt) - 1 + t score response token t, and the
critic's hidden state there is the state before token t. Losses come from `algos.rl`.
A DeepSpeed ZeRO-3 trainer group (as `runtime/train.py` runs for SFT) is the follow-up for
models that do not fit one process.
"""

from __future__ import annotations

import os
import random
import shutil
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from dromedary_ray.algos.ppo import length_mask, minibatches, pad_right, unpad
from dromedary_ray.config import PPOConfig
from dromedary_ray.errors import DromedaryError

STATE_FILE = "trainer.pt"


@dataclass
class _Batch:
    input_ids: Any  # [B, L] prompt + response, right-padded
    attention: Any  # [B, L]
    positions: Any  # [B, T] index of the logit that scores response token t
    response_ids: Any  # [B, T]
    mask: Any  # [B, T] 1.0 on response tokens
    lengths: list[int]  # response lengths


class PPOTrainer:
    def __init__(self, policy_path: str, cfg: PPOConfig, value_init_path: str | None = None,
                 num_threads: int = 1, use_gpu: bool = False):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(max(1, num_threads))  # Ray does not pin threads for us
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        self.cfg = cfg
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.temperature = cfg.sampling.temperature
        self.tokenizer = AutoTokenizer.from_pretrained(policy_path)
        self.pad_id = self.tokenizer.pad_token_id or self.tokenizer.eos_token_id or 0

        def causal_lm() -> Any:
            model = AutoModelForCausalLM.from_pretrained(policy_path, dtype=torch.float32)
            model.config.use_cache = False
            return model.to(self.device).eval()  # eval: no dropout in PPO's ratios

        self.policy, self.ref = causal_lm(), causal_lm()
        self.ref.requires_grad_(False)
        self.critic = (_load_critic(policy_path, value_init_path, self.policy.config)
                       .to(self.device).eval() if cfg.advantage == "gae" else None)
        self.policy_opt = torch.optim.AdamW(self.policy.parameters(), lr=cfg.learning_rate)
        self.value_opt = (torch.optim.AdamW(self.critic.parameters(),
                                            lr=cfg.value_learning_rate)
                          if self.critic is not None else None)

    # --- forward passes over rollouts ---------------------------------------------------------

    def _batch(self, rollouts: pa.Table) -> _Batch:
        import torch

        prompts = rollouts["prompt_token_ids"].to_pylist()
        responses = rollouts["response_token_ids"].to_pylist()
        seqs = [p + r for p, r in zip(prompts, responses, strict=True)]
        lengths = [len(r) for r in responses]
        if min(lengths, default=1) < 1:
            raise DromedaryError("a rollout has an empty response; nothing to train on")
        width, steps = max(len(s) for s in seqs), max(lengths)
        ids = pad_right(seqs, width, torch.long, self.pad_id)
        attention = length_mask([len(s) for s in seqs], width).long()
        starts = torch.tensor([len(p) for p in prompts])
        positions = (starts[:, None] - 1 + torch.arange(steps)[None, :]).clamp(max=width - 1)
        return _Batch(ids, attention, positions, pad_right(responses, steps, torch.long),
                      length_mask(lengths, steps), lengths)

    def _logits(self, model: Any, b: _Batch, idx: list[int]) -> Any:
        """Temperature-scaled logits scoring each response token of rows `idx`: [b, T, V]."""
        ids, att, pos = (t[idx].to(self.device) for t in (b.input_ids, b.attention, b.positions))
        # Only positions from the earliest response start on are needed: skip the rest.
        keep = ids.shape[1] - int(pos[:, 0].min())
        logits = model(input_ids=ids, attention_mask=att, logits_to_keep=keep).logits
        pos = pos - (ids.shape[1] - keep)
        picked = logits.gather(1, pos[..., None].expand(-1, -1, logits.shape[-1]))
        return picked.float() / self.temperature

    def _token_logprobs(self, model: Any, b: _Batch, idx: list[int]) -> tuple[Any, Any]:
        logits = self._logits(model, b, idx)
        resp = b.response_ids[idx].to(self.device)
        return logits.log_softmax(-1).gather(-1, resp[..., None]).squeeze(-1), logits

    def _values(self, b: _Batch, idx: list[int]) -> Any:
        ids, att, pos = (t[idx].to(self.device) for t in (b.input_ids, b.attention, b.positions))
        hidden = self.critic.base_model(input_ids=ids, attention_mask=att).last_hidden_state
        picked = hidden.gather(1, pos[..., None].expand(-1, -1, hidden.shape[-1]))
        return self.critic.score(picked)[..., 0].float()

    def _no_grad_pass(self, rollouts: pa.Table, fn: Any) -> list[list[float]]:
        import torch

        b = self._batch(rollouts)
        size = self.cfg.mini_batch_size
        chunks = []
        with torch.no_grad():
            for start in range(0, len(b.lengths), size):
                chunks.append(fn(b, list(range(start, min(start + size, len(b.lengths))))).cpu())
        width = b.mask.shape[1]
        padded = torch.cat([torch.nn.functional.pad(c, (0, width - c.shape[1])) for c in chunks])
        return unpad(padded, b.lengths)

    def policy_logprobs(self, rollouts: pa.Table) -> list[list[float]]:
        """Each response token's log-prob under the current policy (PPO's "old" policy)."""
        return self._no_grad_pass(rollouts, lambda b, i: self._token_logprobs(self.policy, b, i)[0])

    def ref_logprobs(self, rollouts: pa.Table) -> list[list[float]]:
        """Each response token's log-prob under the frozen reference (the SFT model)."""
        return self._no_grad_pass(rollouts, lambda b, i: self._token_logprobs(self.ref, b, i)[0])

    def values(self, rollouts: pa.Table) -> list[list[float]]:
        """The critic's value of the state before each response token."""
        if self.critic is None:
            raise DromedaryError(f"advantage {self.cfg.advantage} runs without a critic")
        return self._no_grad_pass(rollouts, self._values)

    # --- the update ---------------------------------------------------------------------------

    def update(self, rollouts: pa.Table, step: int) -> dict[str, float]:
        """`ppo_epochs` passes over the rollouts in shuffled minibatches; mean metrics.

        Reads `policy_logprobs` (old), `advantages`, and for the critic `values` (old) and
        `returns` from the rows.
        """
        b = self._batch(rollouts)
        width = b.mask.shape[1]
        col = {k: pad_right(rollouts[k].to_pylist(), width)
               for k in ("policy_logprobs", "advantages", "values", "returns")
               if self.critic is not None or k in ("policy_logprobs", "advantages")}
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

    def _policy_step(self, b: _Batch, idx: list[int], col: dict[str, Any]) -> dict[str, float]:
        from dromedary_ray.algos.rl import entropy_from_logits, masked_mean, ppo_policy_loss

        mask = b.mask[idx].to(self.device)
        logprobs, logits = self._token_logprobs(self.policy, b, idx)
        out = ppo_policy_loss(logprobs, col["policy_logprobs"][idx].to(self.device),
                              col["advantages"][idx].to(self.device), mask, self.cfg.clip_eps)
        out.loss.backward()
        norm = self._step(self.policy, self.policy_opt)
        entropy = masked_mean(entropy_from_logits(logits.detach()), mask)
        return {"policy_loss": float(out.loss.detach()), "clip_fraction": float(out.clip_frac),
                "approx_kl": float(out.approx_kl), "entropy": float(entropy),
                "policy_grad_norm": norm}

    def _value_step(self, b: _Batch, idx: list[int], col: dict[str, Any]) -> dict[str, float]:
        from dromedary_ray.algos.rl import ppo_value_loss

        mask = b.mask[idx].to(self.device)
        loss, clip_frac = ppo_value_loss(self._values(b, idx), col["values"][idx].to(self.device),
                                         col["returns"][idx].to(self.device), mask,
                                         self.cfg.value_clip_eps)
        loss.backward()
        norm = self._step(self.critic, self.value_opt)
        return {"value_loss": float(loss.detach()), "value_clip_fraction": float(clip_frac),
                "value_grad_norm": norm}

    def _step(self, model: Any, opt: Any) -> float:
        import torch

        limit = self.cfg.max_grad_norm or float("inf")  # 0: report the norm, clip nothing
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), limit)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(norm)

    # --- weights out, checkpoints -------------------------------------------------------------

    def state_dict_for_sync(self) -> dict[str, Any]:
        """The policy's weights by HF name, on CPU, for `RolloutActor.update_weights`."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.policy.state_dict().items()}

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
        """The policy as a Hugging Face folder, written beside and renamed into place."""
        tmp = f"{out_dir}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        self.policy.config.use_cache = True  # off for training; generation wants it
        self.policy.save_pretrained(tmp, safe_serialization=True)
        self.policy.config.use_cache = False
        self.tokenizer.save_pretrained(tmp)
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
        return out_dir

    def health(self) -> dict[str, Any]:
        return {"device": str(self.device), "critic": self.critic is not None,
                "pid": os.getpid()}


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
