"""Tables written by the training stages (engrave; later verbose clone, RM, I-SHEEP SFT).

Kept apart from `schemas.py` (the generation stages' tables); same `Row` conventions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pyarrow as pa

from dromedary_ray.data.schemas import Row


@dataclass(frozen=True)
class TrainSummaryRow(Row):
    """One fine-tuning run: what it read, what it did, where the model is."""

    id: str  # the stage name: one row per training stage
    base_model: str  # the model spec trained from (e.g. builtin:smollm2-135m)
    model_dir: str  # the Hugging Face folder written
    method: str  # full | lora
    merged: bool  # LoRA merged into full weights (always true for full fine-tuning)
    examples: int  # records trained on
    dropped_prompt_too_long: int  # records whose prompt alone filled max_seq_len
    truncated: int  # answers cut at max_seq_len
    steps: int
    first_loss: float
    final_loss: float
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
            ("merged", pa.bool_()),
            ("examples", pa.int64()),
            ("dropped_prompt_too_long", pa.int64()),
            ("truncated", pa.int64()),
            ("steps", pa.int64()),
            ("first_loss", pa.float64()),
            ("final_loss", pa.float64()),
            ("tokens_per_second", pa.float64()),
            ("seconds", pa.float64()),
            ("resumed_from_step", pa.int64()),
            ("trainable_params", pa.int64()),
            ("total_params", pa.int64()),
        ]
    )
