"""The PPO trainer actor: policy, critic and frozen reference in one process, plain PyTorch.

- policy: the SFT model (`AutoModelForCausalLM`), trained with the clipped surrogate.
- critic: a policy-shaped backbone with a scalar head (`AutoModelForSequenceClassification`,
  one label), started from the reward model (SALMON, as AlpacaFarm: the RM already reads
  responses) or from the policy with a zero head; per-token values come from the head applied
  at every position (`forward.TokenValues`). Absent for the critic-free advantages (rloo, group).
- reference: a frozen copy of the SFT model, for the KL penalty; with `ppo.lora` the policy's
  own base with its adapter switched off (no second copy).

All three are fp32 (AdamW on bf16 weights loses small updates). The forward passes and the
update are `core.TrainerCore`'s, shared with the DeepSpeed ZeRO-3 trainer group (`ds_trainer.py`,
`ppo.trainer: deepspeed`) that models too large for one process need; this class adds plain
autograd, AdamW, checkpoints and the weights the engines load.
"""

from __future__ import annotations

import copy
import os
import random
import shutil
from typing import Any

from dromedary_ray.config import EngineConfig, PPOConfig
from dromedary_ray.errors import DromedaryError
from dromedary_ray.runtime.faults import maybe_die
from dromedary_ray.runtime.ppo.core import TrainerCore
from dromedary_ray.runtime.ppo.forward import ADAMW_WEIGHT_DECAY, TokenValues
from dromedary_ray.runtime.ppo.rollout import WeightsUpdate

STATE_FILE = "trainer.pt"


class PPOTrainer(TrainerCore):
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
        self.rank, self.world = 0, 1
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

    # --- the hooks of TrainerCore: plain autograd and AdamW -----------------------------------

    def _peft_policy(self) -> Any:
        return self.policy

    def _backward(self, which: str, loss: Any, last: bool) -> None:
        loss.backward()  # gradients add up over the micro-batches until the step

    def _optimizer_step(self, which: str) -> float:
        import torch

        model, opt = (self.policy, self.policy_opt) if which == "policy" else \
            (self.critic, self.value_opt)
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

        maybe_die("trainer_load")  # fault tests: the trainer dies while a run resumes
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
