"""The pure parts of a PPO step: padding, reward shaping, advantages, and what each step draws.

Everything between "the rollouts are scored" and "the trainer updates" that is arithmetic or a
seeded choice lives here, so the driver loop stays a list of calls and all of it is tested in
milliseconds (tests/test_ppo_algos.py). Rollouts of one step are ordered prompt-major: the
`samples_per_prompt` samples of a prompt are adjacent, which the group advantages rely on.
Shapes: B rollouts, T response tokens (right-padded), P prompts, G samples per prompt.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from typing import NamedTuple

import torch

from dromedary_ray.algos.rl import (
    gae_advantages,
    group_normalized_advantages,
    kl_estimators,
    length_bonus_and_unfinished_penalty,
    masked_mean,
    masked_sum,
    masked_whiten,
    rloo_advantages,
    token_kl_penalty_rewards,
)
from dromedary_ray.config import PPOConfig
from dromedary_ray.salmon_principles import (
    SalmonPrinciple,
    SalmonPrincipleSet,
    classify_prompt,
    sample_principles,
)

# --- batching --------------------------------------------------------------------------------


def pad_right(seqs: Sequence[Sequence[float]], width: int | None = None,
              dtype: torch.dtype = torch.float32, value: float = 0.0) -> torch.Tensor:
    """Ragged rows to one right-padded tensor. seqs: B lists -> [B, width or longest]."""
    width = max((len(s) for s in seqs), default=0) if width is None else width
    out = torch.full((len(seqs), width), value, dtype=dtype)
    for i, s in enumerate(seqs):
        if len(s) > width:
            raise ValueError(f"row {i} has {len(s)} entries, over the width {width}")
        if len(s):
            out[i, :len(s)] = torch.as_tensor(list(s), dtype=dtype)
    return out


def length_mask(lengths: Sequence[int], width: int | None = None) -> torch.Tensor:
    """[B] lengths -> [B, T] float mask, 1.0 on each row's first `length` positions."""
    width = max(lengths, default=0) if width is None else width
    return (torch.arange(width)[None, :] < torch.as_tensor(list(lengths))[:, None]).float()


def unpad(x: torch.Tensor, lengths: Sequence[int]) -> list[list[float]]:
    """[B, T] -> B lists, row i cut to lengths[i] (the inverse of `pad_right`)."""
    return [x[i, :n].tolist() for i, n in enumerate(lengths)]


# --- rewards and advantages ------------------------------------------------------------------


class StepAdvantages(NamedTuple):
    advantages: torch.Tensor  # [B, T], zero off the mask
    returns: torch.Tensor | None  # [B, T] value targets (gae); None for critic-free methods
    rewards: torch.Tensor  # [B] score + length bonus - unfinished penalty (before KL)
    kl: torch.Tensor  # [B] sum over a response's tokens of log pi - log ref (k1)


def shaped_rewards(cfg: PPOConfig, scores: torch.Tensor, mask: torch.Tensor,
                   finished: torch.Tensor) -> torch.Tensor:
    """SALMON's length bonus and unfinished penalty on the RM scores. [B], [B, T], [B] -> [B]."""
    return length_bonus_and_unfinished_penalty(
        scores, mask.sum(-1), finished, cfg.length_bonus_per_token, cfg.unfinished_penalty,
        cfg.max_bonus)


def compute_advantages(cfg: PPOConfig, scores: torch.Tensor, logprobs: torch.Tensor,
                       ref_logprobs: torch.Tensor, mask: torch.Tensor, finished: torch.Tensor,
                       values: torch.Tensor | None = None) -> StepAdvantages:
    """Advantages of one step's rollouts by `cfg.advantage`.

    scores, finished: [B]; logprobs (policy at rollout), ref_logprobs, mask, values: [B, T].
    gae: the KL penalty goes into every token's reward and the shaped score into the last
    (Ziegler et al. 2019), then GAE against the critic's values, whitened over the step.
    rloo / group: critic-free; the sequence's reward minus kl_coef x its summed KL estimate
    is compared within each prompt's G samples, and the result repeated over its tokens.
    """
    rewards = shaped_rewards(cfg, scores, mask, finished)
    kl = masked_sum(logprobs - ref_logprobs, mask, dim=-1)
    if cfg.advantage == "gae":
        if values is None:
            raise ValueError("gae advantages need the critic's values")
        token_rewards = token_kl_penalty_rewards(rewards, logprobs, ref_logprobs, mask,
                                                 cfg.kl_coef, cfg.kl_estimator)
        adv, returns = gae_advantages(token_rewards, values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages and mask.sum() >= 2:
            adv = masked_whiten(adv, mask) * mask
        return StepAdvantages(adv, returns, rewards, kl)
    per_token = getattr(kl_estimators(logprobs, ref_logprobs), cfg.kl_estimator)
    sequence = rewards - cfg.kl_coef * masked_sum(per_token, mask, dim=-1)
    grouped = sequence.view(-1, cfg.samples_per_prompt)
    seq_adv = (rloo_advantages(grouped) if cfg.advantage == "rloo"
               else group_normalized_advantages(grouped)).reshape(-1)
    return StepAdvantages(seq_adv[:, None] * mask, None, rewards, kl)


def step_stats(adv: StepAdvantages, scores: torch.Tensor, mask: torch.Tensor,
               finished: torch.Tensor) -> dict[str, float]:
    """The per-step numbers the driver logs about its rollouts (no trainer numbers)."""
    lengths = mask.sum(-1)
    return {
        "score_mean": float(scores.mean()),
        "reward_mean": float(adv.rewards.mean()),
        "reward_std": float(adv.rewards.std()) if len(scores) > 1 else 0.0,
        "kl": float(adv.kl.mean()),
        "response_length": float(lengths.mean()),
        "finished_fraction": float(finished.float().mean()),
        "advantage_mean": float(masked_mean(adv.advantages, mask)),
    }


# --- what a step draws -----------------------------------------------------------------------


def _digest_int(*parts: object) -> int:
    text = "/".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big")


def step_prompt_indices(n_prompts: int, per_step: int, step: int, seed: int) -> list[int]:
    """Indices of the prompts of `step` (1-based): consecutive slices of a per-epoch shuffle.

    A pure function of its arguments, so a resumed run draws the same prompts at the same
    step; an epoch boundary inside a step simply continues into the next epoch's order.
    """
    if n_prompts < 1:
        raise ValueError("no prompts to draw from")
    picked = []
    for pos in range((step - 1) * per_step, step * per_step):
        epoch, offset = divmod(pos, n_prompts)
        order = list(range(n_prompts))
        random.Random(_digest_int("epoch", seed, epoch)).shuffle(order)
        picked.append(order[offset])
    return picked


def sample_seed(seed: int, step: int, prompt_id: str, sample: int) -> int:
    """The sampling seed of one rollout: the same rollout whatever the batch or the restart."""
    return _digest_int("sample", seed, step, prompt_id, sample)


def rollout_principles(pset: SalmonPrincipleSet, prompt: str, prompt_id: str, step: int,
                       cfg: PPOConfig) -> tuple[str, list[SalmonPrinciple]]:
    """The prompt's type and the principles its responses are scored under (SALMON §3.3).

    `principles_per_prompt` drawn by the type's weights, then every intervention principle
    when `use_interventions`. Seeded per (seed, step, prompt): all samples of a prompt share
    them, so the group advantages compare responses under the same reward.
    """
    prompt_type = classify_prompt(prompt, pset)
    rng = random.Random(_digest_int("principles", cfg.seed, step, prompt_id))
    drawn = sample_principles(pset, prompt_type, cfg.principles_per_prompt, rng)
    extra = list(pset.interventions) if cfg.use_interventions else []
    return prompt_type, drawn + extra


def minibatches(n: int, size: int, seed: int, step: int, epoch: int) -> list[list[int]]:
    """A seeded shuffle of range(n) cut into minibatches of `size` (the last may be short)."""
    order = list(range(n))
    random.Random(_digest_int("minibatch", seed, step, epoch)).shuffle(order)
    return [order[i:i + size] for i in range(0, n, size)]
