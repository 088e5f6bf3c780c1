"""Reward-model data: principle-conditioned pairs as token ids, the held-out split, padding.

SALMON's reward model (Sun et al. 2023, §3.2) scores ONE response against a list of principles,
some of them negated: its input is `render_rm_input(prompt, response, principles)` and its
output one scalar, read at the last token by a linear head. An `RMExample` (algos/salmon_prefs)
becomes two such inputs, chosen and rejected, trained with the pairwise Bradley-Terry loss.

Pure code (torch, no Ray or DeepSpeed): `runtime/train_rm.py` is the distributed shell around it
and `engines/reward.py` scores with the same encoding. Shapes: B = pairs in a
micro-batch, T = padded sequence length.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from dromedary_ray.algos.rl import bradley_terry_loss
from dromedary_ray.algos.salmon_prefs import RMExample
from dromedary_ray.salmon_principles import SalmonPrinciple, SalmonPrincipleSet, render_rm_input

REJECT_RM_INPUT_TOO_LONG = "rm_input_too_long"


@dataclass(frozen=True)
class RMPair:
    chosen_ids: list[int]
    rejected_ids: list[int]

    @property
    def tokens(self) -> int:
        return len(self.chosen_ids) + len(self.rejected_ids)


@dataclass(frozen=True)
class RMDataset:
    pairs: list[RMPair]
    kept: list[int]  # position in the input of each pair
    too_long: list[tuple[int, int]] = field(default_factory=list)  # (position, longer side's len)


# --- the held-out split ------------------------------------------------------------------------


def is_heldout(pair_id: str, fraction: float, seed: int = 0) -> bool:
    """Whether a response pair is held out from training, decided by a hash of its id.

    By pair, not by example: the draws of one pair share prompt and responses, so splitting
    them would leak the held-out pair into training. A hash (not a shuffle) keeps the answer
    for a pair the same whatever else is in the data, so a resumed or grown run keeps it.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"heldout fraction must be in [0, 1), got {fraction}")
    digest = hashlib.sha256(f"rm-heldout\x00{seed}\x00{pair_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2.0 ** 64


def split_heldout(examples: Sequence[RMExample], fraction: float, seed: int = 0
                  ) -> tuple[list[RMExample], list[RMExample]]:
    """(train, held-out) in input order; all draws of a pair land on the same side."""
    train, heldout = [], []
    for ex in examples:
        (heldout if is_heldout(ex.pair_id, fraction, seed) else train).append(ex)
    return train, heldout


# --- text and tokens ---------------------------------------------------------------------------


def example_principles(pset: SalmonPrincipleSet, example: RMExample
                       ) -> list[tuple[SalmonPrinciple, bool]]:
    """The (principle, negated) list an example was labelled under, in its drawn order."""
    return [(pset.get(name), neg) for name, neg in zip(example.principles, example.negated,
                                                       strict=True)]


def example_texts(pset: SalmonPrincipleSet, example: RMExample) -> tuple[str, str]:
    """The reward model's input for the chosen and for the rejected response."""
    principles = example_principles(pset, example)
    return (render_rm_input(pset, example.prompt, example.chosen, principles),
            render_rm_input(pset, example.prompt, example.rejected, principles))


def encode_rm_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of one RM input, encoded as transformers and vLLM do by default.

    Special tokens are added the tokenizer's own way (BOS for LLaMA's, none for SmolLM2's):
    the scorer, the held-out evaluation and a vLLM reward runner then all see the same ids.
    """
    return list(tokenizer(text).input_ids)


def encode_pairs(tokenizer: Any, texts: Sequence[tuple[str, str]], max_seq_len: int,
                 pad_id: int) -> RMDataset:
    """Tokenise (chosen, rejected) texts; a pair with either side over `max_seq_len` is dropped.

    Not truncated: the principles and the scoring cue sit at the end of the input, where the
    head reads, so cutting either end would change what is being scored. An input ending in the
    pad token cannot be scored (the head takes the last non-pad token) and raises.
    """
    pairs, kept, too_long = [], [], []
    for i, (chosen, rejected) in enumerate(texts):
        ids = (encode_rm_text(tokenizer, chosen), encode_rm_text(tokenizer, rejected))
        for side in ids:
            if side and side[-1] == pad_id:
                raise ValueError("an RM input ends with the pad token; the score head would "
                                 "read an earlier token (end the rm_prompt template with text)")
        longest = max(len(s) for s in ids)
        if longest > max_seq_len:
            too_long.append((i, longest))
            continue
        pairs.append(RMPair(*ids))
        kept.append(i)
    return RMDataset(pairs, kept, too_long)


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids and attention_mask [N, T], right-padded to the longest sequence."""
    if not seqs:
        raise ValueError("pad_right needs at least one sequence")
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, :len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[row, :len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def collate_pairs(pairs: Sequence[RMPair], pad_id: int) -> dict[str, torch.Tensor]:
    """One forward's batch [2B, T]: rows 0..B-1 the chosen inputs, rows B..2B-1 the rejected.

    Both sides in one forward halve the ZeRO-3 parameter gathers of two separate forwards.
    """
    return pad_right([p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs], pad_id)


def split_scores(scores: torch.Tensor, n_pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[2B] or [2B, 1] scores of a `collate_pairs` batch -> (chosen [B], rejected [B])."""
    flat = scores.reshape(-1)
    if flat.numel() != 2 * n_pairs:
        raise ValueError(f"expected {2 * n_pairs} scores, got {flat.numel()}")
    return flat[:n_pairs], flat[n_pairs:]


def pairwise_sums(chosen: torch.Tensor, rejected: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed Bradley-Terry loss and the count of pairs ranked right. [B], [B] -> scalars.

    Sums, not means, so micro-batches and ranks combine under one global normaliser (the pairs
    of the whole optimizer step), as `algos.sft.data_parallel_loss` does for tokens.
    """
    loss = bradley_terry_loss(chosen.float(), rejected.float()) * chosen.numel()
    return loss, (chosen > rejected).sum()
