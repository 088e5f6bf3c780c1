"""What both PPO trainers do with their models and a rollout table, written once: the forward
passes (old log-probs, reference log-probs, values) and the update (seeded minibatches, each
accumulated over micro-batches of `ppo.micro_batch_size` rows).

`trainer.PPOTrainer` (one process, plain PyTorch) is world 1, rank 0; a `ds_trainer.PPORank`
is one rank of a DeepSpeed ZeRO-3 group. They differ only in how a loss is back-propagated,
how the optimizer steps, and how a few scalars are summed over ranks: the hooks at the end.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import pyarrow as pa

from dromedary_ray.algos.ppo import minibatches, unpad
from dromedary_ray.config import PPOConfig
from dromedary_ray.errors import DromedaryError
from dromedary_ray.runtime.faults import maybe_die
from dromedary_ray.runtime.ppo.forward import (
    LOSS_STATS,
    Batch,
    build_batch,
    policy_terms,
    row_columns,
    token_logprobs,
    token_values,
    value_terms,
)


class TrainerCore:
    """Set by a subclass: `cfg`, `rank`, `world`, `device`,
    `temperature`, `pad_id`, `policy`, `ref` (None with LoRA: the policy's base is the
    reference), `critic` (None for the critic-free advantages)."""

    cfg: PPOConfig
    rank: int
    world: int
    device: Any
    temperature: float
    pad_id: int
    policy: Any
    ref: Any
    critic: Any

    @property
    def share(self) -> int:
        """Rows of each minibatch this rank trains on."""
        return self.cfg.mini_batch_size // self.world

    @property
    def micro(self) -> int:
        """Rows in each forward and backward."""
        return self.cfg.rows_per_forward

    # --- forward passes over rollouts ---------------------------------------------------------

    def _rows_pass(self, rollouts: pa.Table, fn: Any) -> list[list[float]]:
        """`fn(batch, rows)` over this rank's contiguous block of rows, in micro-batches, without
        gradients; the per-token results of those rows, unpadded.

        Every rank runs the same number of forwards (ZeRO-3 gathers parameters collectively
        in each): one whose block ran out forwards row 0 and drops the result.
        """
        import torch

        b = build_batch(rollouts, self.pad_id)
        n = len(b.lengths)
        block = math.ceil(n / self.world)
        mine = list(range(self.rank * block, min(n, (self.rank + 1) * block)))
        out: list[list[float]] = []
        with torch.no_grad():
            for j in range(math.ceil(block / self.micro)):
                rows = mine[j * self.micro:(j + 1) * self.micro]
                values = fn(b, rows or [0]).cpu()
                if rows:
                    out.extend(unpad(values, [b.lengths[i] for i in rows]))
        return out

    def _logprobs(self, model: Any, b: Batch, rows: list[int]) -> Any:
        return token_logprobs(model, b, rows, self.device, self.temperature)

    def policy_logprobs(self, rollouts: pa.Table) -> list[list[float]]:
        """Each response token's log-prob under the current policy (PPO's "old" policy)."""
        return self._rows_pass(rollouts, lambda b, i: self._logprobs(self.policy, b, i))

    def ref_logprobs(self, rollouts: pa.Table) -> list[list[float]]:
        """Each response token's log-prob under the frozen reference (the SFT model)."""
        if self.ref is not None:
            return self._rows_pass(rollouts, lambda b, i: self._logprobs(self.ref, b, i))
        with self._peft_policy().disable_adapter():  # LoRA: the base is the SFT model
            return self._rows_pass(rollouts, lambda b, i: self._logprobs(self.policy, b, i))

    def values(self, rollouts: pa.Table) -> list[list[float]]:
        """The critic's value of the state before each response token."""
        if self.critic is None:
            raise DromedaryError(f"advantage {self.cfg.advantage} runs without a critic")
        return self._rows_pass(rollouts, lambda b, i: token_values(self.critic, b, i,
                                                                   self.device))

    # --- the update ----------------------------------------------------------------------------

    def update(self, rollouts: pa.Table, step: int) -> dict[str, float]:
        """`ppo_epochs` passes over the rollouts in seeded minibatches, each split evenly over
        the ranks; mean metrics (global: the same on every rank).

        Reads `policy_logprobs` (old), `advantages`, and for the critic `values` (old) and
        `returns` from the rows.
        """
        maybe_die("trainer_update")  # fault tests: the trainer (or one rank) dies mid-step
        b = build_batch(rollouts, self.pad_id)
        col = row_columns(rollouts, b, self.critic is not None)
        stats: dict[str, list[float]] = defaultdict(list)
        for epoch in range(self.cfg.ppo_epochs):
            for idx in minibatches(len(b.lengths), self.cfg.mini_batch_size, self.cfg.seed,
                                   step, epoch):
                mine = idx[self.rank * self.share:(self.rank + 1) * self.share]
                tokens = float(b.mask[idx].sum())  # the whole minibatch's, all ranks
                for k, v in self._policy_step(b, mine, col, tokens).items():
                    stats[k].append(v)
                if self.critic is not None:
                    for k, v in self._value_step(b, mine, col, tokens).items():
                        stats[k].append(v)
        return {k: sum(v) / len(v) for k, v in stats.items()}

    def _accumulate(self, which: str, terms_fn: Any, b: Batch, mine: list[int],
                    tokens: float) -> tuple[list[float], float]:
        """Back-propagate `terms_fn`'s loss over `mine` in micro-batches, each weighted by its
        share of the minibatch's tokens (x world: DeepSpeed averages gradients over ranks), so
        the gradient is the whole minibatch's token mean; then step. Returns the minibatch's
        token-mean terms (all ranks) and the gradient norm."""
        micros = [mine[i:i + self.micro] for i in range(0, len(mine), self.micro)]
        sums = None
        for j, rows in enumerate(micros):
            loss, terms = terms_fn(rows)
            weight = float(b.mask[rows].sum()) / tokens
            self._backward(which, loss * (weight * self.world), last=j == len(micros) - 1)
            sums = terms * weight if sums is None else sums + terms * weight
        norm = self._optimizer_step(which)
        return self._sum_over_ranks(sums).tolist(), norm

    def _policy_step(self, b: Batch, mine: list[int], col: dict[str, Any],
                     tokens: float) -> dict[str, float]:
        terms, norm = self._accumulate(
            "policy", lambda rows: policy_terms(self.policy, b, rows, col, self.cfg.clip_eps,
                                                self.device, self.temperature),
            b, mine, tokens)
        out = dict(zip(LOSS_STATS, terms, strict=True))
        return {"policy_loss": out["loss"], "clip_fraction": out["clip_fraction"],
                "approx_kl": out["approx_kl"], "entropy": out["entropy"],
                "policy_grad_norm": norm}

    def _value_step(self, b: Batch, mine: list[int], col: dict[str, Any],
                    tokens: float) -> dict[str, float]:
        (loss, clip), norm = self._accumulate(
            "critic", lambda rows: value_terms(self.critic, b, rows, col,
                                               self.cfg.value_clip_eps, self.device),
            b, mine, tokens)
        return {"value_loss": loss, "value_clip_fraction": clip, "value_grad_norm": norm}

    # --- what differs between the trainers -----------------------------------------------------

    def _peft_policy(self) -> Any:
        """The policy's peft model (for `disable_adapter`)."""
        raise NotImplementedError

    def _backward(self, which: str, loss: Any, last: bool) -> None:
        """Back-propagate `loss` into model `which` ("policy" or "critic"); `last`: the
        minibatch's final micro-batch."""
        raise NotImplementedError

    def _optimizer_step(self, which: str) -> float:
        """Clip, step and clear model `which`'s gradients; the gradient norm before clipping."""
        raise NotImplementedError

    def _sum_over_ranks(self, sums: Any) -> Any:
        """A few scalars (a CPU tensor) summed over the ranks; one process: as they are."""
        return sums
