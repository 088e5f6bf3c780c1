"""Supervised fine-tuning data and loss: tokenised examples, padding, data-parallel plans.

Principle engraving (Self-Align §3.3) fine-tunes the base model on the (query, answer) pairs of
the principle-driven stage with the principles, the exemplars and the internal thoughts removed,
so the model learns to answer that way unprompted. The loss covers the answer tokens only.

Pure code (torch, no Ray or DeepSpeed): the trainer in `runtime/train.py` is a shell around it.
Shapes: B = micro-batch size, T = padded sequence length, V = vocabulary size.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

IGNORE_INDEX = -100  # the label torch's cross-entropy skips: prompt tokens and padding


@dataclass(frozen=True)
class SFTExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on the prompt; the answer ids (and EOS) where learned

    @property
    def num_targets(self) -> int:
        """Tokens the loss is computed on. Label 0 has no preceding token to predict it from."""
        return sum(1 for t in self.labels[1:] if t != IGNORE_INDEX)


@dataclass(frozen=True)
class SFTDataset:
    examples: list[SFTExample]
    # (record position, prompt tokens) of records whose prompt leaves no room for an answer
    dropped: list[tuple[int, int]] = field(default_factory=list)
    truncated: int = 0  # answers cut at max_seq_len (their EOS was lost)

    @property
    def dropped_prompt_too_long(self) -> int:
        return len(self.dropped)


def build_example(prompt_ids: Sequence[int], answer_ids: Sequence[int], eos_id: int,
                  max_seq_len: int) -> tuple[SFTExample | None, bool]:
    """One (prompt, answer) pair as input ids and labels; returns (example, truncated).

    The answer is followed by EOS so the model learns to stop where the self-aligned answer
    stopped. An example whose prompt fills `max_seq_len` teaches nothing and is dropped (None)
    rather than truncated from the left, which would cut the question the answer replies to.
    """
    if len(prompt_ids) >= max_seq_len:
        return None, False
    target = [*answer_ids, eos_id]
    room = max_seq_len - len(prompt_ids)
    truncated = len(target) > room
    target = target[:room]
    example = SFTExample(
        input_ids=[*prompt_ids, *target],
        labels=[IGNORE_INDEX] * len(prompt_ids) + target,
    )
    return example, truncated


def encode_records(tokenizer: Any, records: Sequence[dict[str, str]],
                   max_seq_len: int) -> SFTDataset:
    """Tokenise (query, answer) records into examples, with the counts of what was cut.

    The prompt is the query alone rendered by the model's own chat template (no principles, no
    exemplars, no thoughts: Self-Align §3.3). Prompt and answer are tokenised separately so the
    label mask falls exactly on the boundary; a chat template already writes its special tokens
    (BOS included), so the prompt gets none added, as in `engines.base.encode_prompts`.
    """
    from dromedary_ray.prompts import render_chat

    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token: answers could never learn to stop")
    add_special = not getattr(tokenizer, "chat_template", None)
    examples, dropped, truncated = [], [], 0
    for i, rec in enumerate(records):
        prompt = render_chat(tokenizer, [{"role": "user", "content": rec["query"]}])
        prompt_ids = tokenizer(prompt, add_special_tokens=add_special).input_ids
        answer_ids = tokenizer(rec["answer"], add_special_tokens=False).input_ids
        example, cut = build_example(prompt_ids, answer_ids, tokenizer.eos_token_id, max_seq_len)
        if example is None:
            dropped.append((i, len(prompt_ids)))
            continue
        examples.append(example)
        truncated += cut
    return SFTDataset(examples, dropped, truncated)


def collate(examples: Sequence[SFTExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch to its longest example: input_ids, labels, attention_mask [B, T].

    Padding is masked twice (attention 0, label IGNORE_INDEX), so the pad id may equal EOS, as
    it does for SmolLM2, without the real EOS targets being lost.
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def masked_copy(example: SFTExample) -> SFTExample:
    """The same tokens with no targets: a rank with no data left runs it to stay in step.

    ZeRO-3 gathers parameters collectively inside every forward, so all ranks must run the
    same number of forwards; this one adds zero loss and zero gradient.
    """
    return SFTExample(list(example.input_ids), [IGNORE_INDEX] * len(example.labels))


# --- data-parallel plans ----------------------------------------------------------------------

# plan[step][micro][rank] -> example indices for that rank's micro-batch (possibly empty)
StepPlan = list[list[list[int]]]


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """A shuffle of range(n) that every worker computes identically (no communication)."""
    order = list(range(n))
    random.Random(f"sft:{seed}:{epoch}").shuffle(order)
    return order


def epoch_rounds(n: int, *, world_size: int, micro_batch_size: int, seed: int,
                 epoch: int) -> list[list[list[int]]]:
    """Split one shuffled epoch into rounds of one micro-batch per rank.

    Every example lands in exactly one (round, rank). Round robin within a round keeps the
    ranks' sizes within one of each other; only the last round can leave a rank empty.
    """
    order = epoch_order(n, seed, epoch)
    per_round = world_size * micro_batch_size
    return [
        [order[start:start + per_round][r::world_size] for r in range(world_size)]
        for start in range(0, n, per_round)
    ]


def plan_steps(n: int, *, world_size: int, micro_batch_size: int, grad_accum: int,
               epochs: int, seed: int, max_steps: int | None = None) -> list[StepPlan]:
    """Optimizer steps over `epochs` passes: each step is up to `grad_accum` rounds.

    Steps do not cross an epoch boundary (the last step of an epoch may hold fewer rounds), so
    a resumed run can be placed exactly by its step count alone.
    """
    if n < 1:
        raise ValueError("no training examples")
    steps: list[StepPlan] = []
    for epoch in range(epochs):
        rounds = epoch_rounds(n, world_size=world_size, micro_batch_size=micro_batch_size,
                              seed=seed, epoch=epoch)
        steps += [rounds[i:i + grad_accum] for i in range(0, len(rounds), grad_accum)]
    return steps[:max_steps] if max_steps is not None else steps


def step_targets(step: StepPlan, examples: Sequence[SFTExample]) -> int:
    """Target tokens in one optimizer step over all ranks: the loss normaliser."""
    return sum(examples[i].num_targets for rnd in step for shard in rnd for i in shard)


# --- loss --------------------------------------------------------------------------------------


def token_nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL over target tokens, and their count.

    logits [B, T, V], labels [B, T]. Position t predicts label t+1 (the causal shift). A sum,
    not a mean, so micro-batches and ranks can be combined with one global normaliser.
    """
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="sum",
    )
    return nll, int((shift_labels != IGNORE_INDEX).sum())


def data_parallel_loss(nll_sum: torch.Tensor, step_target_tokens: int,
                       world_size: int) -> torch.Tensor:
    """The loss one rank back-propagates so that averaged gradients equal the global mean.

    Data-parallel engines average gradients over ranks (÷ world_size) and we backward each
    micro-batch unscaled, so scaling by world_size / (target tokens of the whole step) makes
    the update equal to the mean token loss over the full step, whatever the split: a rank
    with long answers is not down-weighted as a per-rank mean would do.
    """
    return nll_sum * (world_size / max(step_target_tokens, 1))
