"""Pure tensor functions for RL fine-tuning: GAE, PPO losses, KL estimators, RM loss, baselines.

No Ray, DeepSpeed or model code here: every function maps tensors to tensors and states shapes
in its docstring, so the trainer is a thin shell and these are tested in milliseconds
(tests/test_rl_algos.py). Shapes: B batch, T response tokens, P prompts, G samples per prompt,
V vocabulary. `mask` is 1.0 (or True) on response tokens that count and 0 on padding.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

# SALMON's PPO defaults (IBM/SALMON, training/step3_ppo_training/scripts/
# train_ppo_model_70b_qlora_salmon.sh): LENGTH_BONUS=5.0 scaled by len/response_len, capped at
# LENGTH_BONUS_UPPER_BOUND=0.8 of response_len; UNFINISHED_PENALTY=-6.0; KL_COEF=0.01.
SALMON_LENGTH_BONUS = 5.0
SALMON_LENGTH_BONUS_CAP = 0.8
SALMON_UNFINISHED_PENALTY = 6.0
SALMON_KL_COEF = 0.01


# --- masked statistics -----------------------------------------------------------------------


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of `x` where `mask` is set. x, mask: same shape; dim=None sums everything."""
    m = mask.to(x.dtype)
    return (x * m).sum() if dim is None else (x * m).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` over the masked entries. x, mask: same shape -> scalar, or reduced `dim`.

    An all-zero mask gives 0 rather than NaN (an empty micro-batch should not poison a loss).
    """
    m = mask.to(x.dtype)
    count = m.sum() if dim is None else m.sum(dim)
    return masked_sum(x, m, dim) / count.clamp(min=1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of `x` over the masked entries (scalar); Bessel-corrected when `unbiased`."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.to(x.dtype).sum()
        if n < 2:
            raise ValueError("unbiased masked variance needs at least two masked entries")
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
                  eps: float = 1e-8) -> torch.Tensor:
    """Normalise `x` to unit variance (and zero mean if `shift_mean`) over the masked entries.

    x, mask: [B, T] -> [B, T]. Statistics pool every masked token of the batch, as PPO
    implementations do for advantages; unmasked positions are transformed too but meaningless.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    return whitened if shift_mean else whitened + mean


# --- advantages ------------------------------------------------------------------------------


def gae_advantages_loop(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                        gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference GAE (Schulman et al. 2016, eq. 16) written as plain loops, one sample at a time.

    rewards, values, mask: [B, T] -> (advantages, returns), each [B, T], zero off the mask.
    Only masked positions form the trajectory: the value after the last one is 0 (the response
    ended), and a masked-out gap is skipped over. returns = advantages + values.
    """
    adv = torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        steps = [t for t in range(rewards.shape[1]) if mask[b, t]]
        running, next_value = 0.0, 0.0
        for t in reversed(steps):
            delta = float(rewards[b, t]) + gamma * next_value - float(values[b, t])
            running = delta + gamma * lam * running
            adv[b, t] = running
            next_value = float(values[b, t])
    m = mask.to(rewards.dtype)
    return adv, (adv + values) * m


def gae_advantages(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                   gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE for the whole batch at once: one reverse scan over time, no loop over samples.

    rewards, values, mask: [B, T] -> (advantages, returns), each [B, T], zero off the mask.
    Same definition as `gae_advantages_loop`: at a masked-out position the running advantage
    and the bootstrap value are carried through unchanged, so gaps and right padding are
    skipped and the value after a response's last token is 0.
    """
    m = mask.to(rewards.dtype)
    batch, steps = rewards.shape
    next_value = rewards.new_zeros(batch)
    running = rewards.new_zeros(batch)
    adv = torch.zeros_like(rewards)
    for t in reversed(range(steps)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        candidate = delta + gamma * lam * running
        running = m[:, t] * candidate + (1 - m[:, t]) * running
        next_value = m[:, t] * values[:, t] + (1 - m[:, t]) * next_value
        adv[:, t] = running
    adv = adv * m
    return adv, (adv + values) * m


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """REINFORCE leave-one-out (Ahmadian et al. 2024): r_i minus the mean of the other samples.

    rewards: [P, G] (G samples per prompt, G >= 2) -> [P, G].
    """
    groups = rewards.shape[-1]
    if groups < 2:
        raise ValueError("leave-one-out needs at least 2 samples per prompt")
    others = (rewards.sum(-1, keepdim=True) - rewards) / (groups - 1)
    return rewards - others


def group_normalized_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GRPO's outcome advantage (Shao et al. 2024, §4.1.2): (r - group mean) / (group std + eps).

    rewards: [P, G] -> [P, G]. The std is Bessel-corrected, as in common GRPO implementations;
    a group of equal rewards gives zeros.
    """
    if rewards.shape[-1] < 2:
        raise ValueError("group normalisation needs at least 2 samples per prompt")
    mean = rewards.mean(-1, keepdim=True)
    std = rewards.std(-1, keepdim=True)
    return (rewards - mean) / (std + eps)


# --- PPO losses ------------------------------------------------------------------------------


class PolicyLoss(NamedTuple):
    loss: torch.Tensor  # scalar, to minimise
    clip_frac: torch.Tensor  # scalar: share of masked tokens where the clipped branch was taken
    approx_kl: torch.Tensor  # scalar: k3 estimate of KL(old || new) over masked tokens


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, clip_eps: float = 0.2) -> PolicyLoss:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), averaged over masked tokens.

    logprobs (current policy), old_logprobs (rollout policy), advantages, mask: [B, T].
    Per token: max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)), ratio = exp(lp - old_lp).
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_frac = masked_mean((clipped > unclipped).to(logprobs.dtype), mask)
    # Samples come from the old policy, so KL(old||new) = E_old[k3] with r = new/old.
    approx_kl = masked_mean(torch.exp(log_ratio) - 1.0 - log_ratio, mask)
    return PolicyLoss(loss, clip_frac.detach(), approx_kl.detach())


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                   mask: torch.Tensor, clip_eps: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss: 0.5 * max((v - R)^2, (clip(v, v_old +- eps) - R)^2), masked mean.

    values (current critic), old_values (critic at rollout), returns, mask: [B, T]
    -> (loss, clip_frac), both scalars; clip_frac is the share of tokens where clipping bound.
    """
    clipped_values = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    err = (values - returns) ** 2
    err_clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    clip_frac = masked_mean((err_clipped > err).to(values.dtype), mask)
    return loss, clip_frac.detach()


# --- KL and reward shaping -------------------------------------------------------------------


class KLEstimates(NamedTuple):
    k1: torch.Tensor  # log(pi/ref): unbiased, high variance, can be negative
    k2: torch.Tensor  # 0.5 * log(pi/ref)^2: biased, low variance, >= 0
    k3: torch.Tensor  # (r - 1) - log r with r = ref/pi: unbiased, low variance, >= 0


def kl_estimators(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> KLEstimates:
    """Per-token estimators of KL(pi || ref) from J. Schulman, "Approximating KL Divergence" (2020).

    logprobs (policy pi, which sampled the tokens), ref_logprobs: [B, T] -> three [B, T].
    """
    log_ratio = logprobs - ref_logprobs
    return KLEstimates(
        k1=log_ratio,
        k2=0.5 * log_ratio**2,
        k3=torch.exp(-log_ratio) - 1.0 + log_ratio,
    )


def last_valid_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last set position of each row. mask: [B, T] -> [B] (long)."""
    m = mask.bool()
    if not m.any(-1).all():
        raise ValueError("every response needs at least one valid token")
    steps = m.shape[-1]
    return steps - 1 - m.flip(-1).to(torch.long).argmax(-1)


def token_kl_penalty_rewards(scores: torch.Tensor, logprobs: torch.Tensor,
                             ref_logprobs: torch.Tensor, mask: torch.Tensor, beta: float,
                             estimator: str = "k1") -> torch.Tensor:
    """Per-token PPO rewards: -beta * KL at every valid token, the sequence score at the last.

    scores: [B] (reward model output, after any bonus or penalty); logprobs, ref_logprobs,
    mask: [B, T] -> rewards [B, T], zero off the mask. The KL term keeps the policy near the
    reference (Ziegler et al. 2019); `estimator` picks k1, k2 or k3 from `kl_estimators`.
    """
    if estimator not in KLEstimates._fields:
        raise ValueError(f"unknown KL estimator {estimator!r}; use k1, k2 or k3")
    kl = getattr(kl_estimators(logprobs, ref_logprobs), estimator)
    rewards = -beta * kl * mask.to(logprobs.dtype)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last_valid_index(mask)] += scores.to(rewards.dtype)
    return rewards


def length_bonus_and_unfinished_penalty(rewards: torch.Tensor, lengths: torch.Tensor,
                                        finished: torch.Tensor,
                                        bonus_per_token: float | torch.Tensor,
                                        unfinished_penalty: float,
                                        max_bonus: float | None = None) -> torch.Tensor:
    """SALMON's reward adjustments (§3.3 and its PPO script) before KL shaping.

    rewards: [B] RM scores; lengths: [B] response tokens; finished: [B] bool, False when the
    response hit the length limit without its stop token. Returns [B]:
    rewards + min(bonus_per_token * lengths, max_bonus) - unfinished_penalty * (not finished).
    `bonus_per_token` may be a [B] tensor (a per-prompt multiplier folded in, as SALMON turns
    the bonus off for some prompts). SALMON's numbers: bonus_per_token =
    SALMON_LENGTH_BONUS / response_len, max_bonus = SALMON_LENGTH_BONUS * SALMON_LENGTH_BONUS_CAP,
    unfinished_penalty = SALMON_UNFINISHED_PENALTY. The bonus counters the RM's bias towards
    short answers; the penalty stops the policy gaining it by never stopping.
    """
    if unfinished_penalty < 0:
        raise ValueError("unfinished_penalty is an amount to subtract; give it as >= 0")
    bonus = bonus_per_token * lengths.to(rewards.dtype)
    if max_bonus is not None:
        bonus = torch.clamp(bonus, max=max_bonus)
    penalty = unfinished_penalty * (~finished.bool()).to(rewards.dtype)
    return rewards + bonus - penalty


# --- reward model and entropy ----------------------------------------------------------------


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor
                       ) -> torch.Tensor:
    """Pairwise RM loss (Bradley and Terry 1952; Ouyang et al. 2022 eq. 1).

    chosen_scores, rejected_scores: [N] -> scalar mean of -log sigmoid(chosen - rejected).
    """
    return -F.logsigmoid(chosen_scores - rejected_scores).mean()


def pairwise_accuracy(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor
                      ) -> torch.Tensor:
    """Share of pairs where the chosen response scores strictly higher. [N], [N] -> scalar."""
    return (chosen_scores > rejected_scores).to(torch.float32).mean()


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax distribution. logits: [..., V] -> [...].

    H = logsumexp(z) - sum(softmax(z) * z), which never forms log(0) for tiny probabilities.
    """
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)
