"""Tables of the SALMON stages (preferences, ppo; reward_model adds its own here).

Same `Row` conventions as `schemas.py`: one explicit Arrow schema per table, a typed row view.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pyarrow as pa

from dromedary_ray.data.schemas import Row


@dataclass(frozen=True)
class PreferenceRow(Row):
    """A response pair judged under one principle, in both orders (SALMON §3.1).

    `forward`: log p("A") - log p("B") with the responses shown as (A, B); `backward`: the same
    gap with them swapped, turned back to A's side. `score` is their mean (positive: response_a
    is better under this principle); `consistent` is true only where both orders agree.
    """

    id: str  # f"{pair_id}/{principle}"
    pair_id: str  # the prompt id: one response pair per prompt
    prompt_type: str  # general | reasoning | red_team | ... (weights the principles drawn)
    prompt: str
    response_a: str
    response_b: str
    principle: str
    forward: float
    backward: float
    score: float
    consistent: bool

    SCHEMA: ClassVar[pa.Schema] = pa.schema(
        [
            ("id", pa.string()),
            ("pair_id", pa.string()),
            ("prompt_type", pa.string()),
            ("prompt", pa.string()),
            ("response_a", pa.string()),
            ("response_b", pa.string()),
            ("principle", pa.string()),
            ("forward", pa.float64()),
            ("backward", pa.float64()),
            ("score", pa.float64()),
            ("consistent", pa.bool_()),
        ]
    )


@dataclass(frozen=True)
class RMExampleRow(Row):
    """A principle-conditioned preference the reward model trained or was evaluated on
    (written to `<run>/reward_model/examples.parquet` for inspection, not a stage table)."""

    id: str  # f"{pair_id}/{draw}"
    pair_id: str
    draw: int
    split: str  # train | heldout
    prompt: str
    chosen: str
    rejected: str
    principles: list[str]  # names, in the order shown to the reward model
    negated: list[bool]  # per principle: its negation was shown
    decisive_principle: str
    margin: float  # |scaled judge score| of the decisive principle
    flipped: bool  # label noise: chosen/rejected swapped against the judgement
    chosen_tokens: int
    rejected_tokens: int

    SCHEMA: ClassVar[pa.Schema] = pa.schema(
        [
            ("id", pa.string()),
            ("pair_id", pa.string()),
            ("draw", pa.int32()),
            ("split", pa.string()),
            ("prompt", pa.string()),
            ("chosen", pa.string()),
            ("rejected", pa.string()),
            ("principles", pa.list_(pa.string())),
            ("negated", pa.list_(pa.bool_())),
            ("decisive_principle", pa.string()),
            ("margin", pa.float64()),
            ("flipped", pa.bool_()),
            ("chosen_tokens", pa.int32()),
            ("rejected_tokens", pa.int32()),
        ]
    )


@dataclass(frozen=True)
class RMSummaryRow(Row):
    """The reward_model stage's one row: what it trained on, how it did, where the model is."""

    id: str  # the stage name
    base_model: str  # the model spec the RM was initialised from
    model_dir: str  # HF folder of an AutoModelForSequenceClassification with one label
    method: str  # full | lora (merged: the folder always holds plain weights)
    judged_pairs: int  # response pairs read from the preferences table
    rejected_pairs: int  # ... with no consistent judgement
    too_long: int  # examples with an input over max_seq_len
    examples: int  # trained on
    heldout_examples: int
    steps: int
    first_loss: float
    final_loss: float
    train_accuracy: float  # the saved model, re-scored on (a sample of) the training examples
    heldout_accuracy: float | None  # None when nothing was held out
    tokens_per_second: float
    seconds: float
    resumed_from_step: int
    trainable_params: int
    total_params: int

    SCHEMA: ClassVar[pa.Schema] = pa.schema(
        [
            ("id", pa.string()),
            ("base_model", pa.string()),
            ("model_dir", pa.string()),
            ("method", pa.string()),
            ("judged_pairs", pa.int64()),
            ("rejected_pairs", pa.int64()),
            ("too_long", pa.int64()),
            ("examples", pa.int64()),
            ("heldout_examples", pa.int64()),
            ("steps", pa.int64()),
            ("first_loss", pa.float64()),
            ("final_loss", pa.float64()),
            ("train_accuracy", pa.float64()),
            ("heldout_accuracy", pa.float64()),
            ("tokens_per_second", pa.float64()),
            ("seconds", pa.float64()),
            ("resumed_from_step", pa.int64()),
            ("trainable_params", pa.int64()),
            ("total_params", pa.int64()),
        ]
    )


@dataclass(frozen=True)
class RolloutRow(Row):
    """One PPO rollout: a sampled response with what each phase of the step added to it.

    The rollout actor fills the generation fields; the driver the principles, scores and
    advantages; the trainer's forward passes the per-token `policy_logprobs`, `ref_logprobs`
    and `values`. Per-token lists are aligned with `response_token_ids` (empty until their
    phase has run; `values`, `advantages` and `returns` stay empty for critic-free advantages,
    whose one advantage per sequence is repeated over its tokens).
    """

    id: str  # f"{step:06d}/{prompt_id}/{sample}"
    step: int
    prompt_id: str
    sample: int  # 0 .. samples_per_prompt - 1
    prompt_type: str  # from classify_prompt: weights the principles drawn
    prompt: str  # the user's query (the policy saw it rendered as a chat turn)
    response: str
    prompt_token_ids: list[int]  # exactly what the policy was conditioned on
    response_token_ids: list[int]  # sampled tokens, the stop token included
    logprobs: list[float]  # of each response token under the rollout engine (the sampler)
    policy_logprobs: list[float]  # ... recomputed by the trainer before the update (PPO's old)
    ref_logprobs: list[float]  # ... under the frozen reference (the SFT model)
    values: list[float]  # critic's value before each response token
    advantages: list[float]
    returns: list[float]
    principles: list[str]  # names the reward model was shown, interventions included
    score: float  # reward model output
    reward: float  # score after the length bonus and the unfinished penalty
    finished: bool  # ended with a stop token (False: cut at max_new_tokens)

    SCHEMA: ClassVar[pa.Schema] = pa.schema(
        [
            ("id", pa.string()),
            ("step", pa.int32()),
            ("prompt_id", pa.string()),
            ("sample", pa.int32()),
            ("prompt_type", pa.string()),
            ("prompt", pa.string()),
            ("response", pa.string()),
            ("prompt_token_ids", pa.list_(pa.int32())),
            ("response_token_ids", pa.list_(pa.int32())),
            ("logprobs", pa.list_(pa.float32())),
            ("policy_logprobs", pa.list_(pa.float32())),
            ("ref_logprobs", pa.list_(pa.float32())),
            ("values", pa.list_(pa.float32())),
            ("advantages", pa.list_(pa.float32())),
            ("returns", pa.list_(pa.float32())),
            ("principles", pa.list_(pa.string())),
            ("score", pa.float64()),
            ("reward", pa.float64()),
            ("finished", pa.bool_()),
        ]
    )


@dataclass(frozen=True)
class ResponsePairRow(Row):
    """Two responses the policy sampled for one prompt: what the judge compares."""

    id: str  # the prompt id
    prompt_type: str
    prompt: str
    response_a: str
    response_b: str

    SCHEMA: ClassVar[pa.Schema] = pa.schema(
        [("id", pa.string()), ("prompt_type", pa.string()), ("prompt", pa.string()),
         ("response_a", pa.string()), ("response_b", pa.string())]
    )
