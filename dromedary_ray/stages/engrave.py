"""engrave: principle engraving (Self-Align §3.3).

Fine-tune the base model on the self_align stage's (query, answer) pairs with the principles,
the exemplars and the internal thoughts removed from the prompt, so that the model answers in
the principled way with no principles in its context. Training runs on Ray Train with DeepSpeed
(`runtime/train.py`); the model goes to `<run>/engrave/model/`, a one-row summary to the data
table, records too long to train on to the rejects table, and the loss curve (one JSON line per
step) to `<run>/engrave/loss_curve.jsonl`.
"""

from __future__ import annotations

from typing import Any

from dromedary_ray.config import RunConfig
from dromedary_ray.data.schemas import SelfAlignRow
from dromedary_ray.data.train_schemas import TrainSummaryRow
from dromedary_ray.errors import StageError
from dromedary_ray.stages.base import StageContext
from dromedary_ray.stages.sft import check_local_run_dir, fine_tune


class EngraveStage:
    name = "engrave"
    data_schema = TrainSummaryRow.SCHEMA
    uses_ray = True
    trains = True

    def input_stages(self, config: RunConfig) -> tuple[str, ...]:
        return ("self_align",)

    def fingerprint_payload(self, config: RunConfig) -> dict[str, Any]:
        return {"engrave": config.section("engrave"), "model": config.model}

    def check(self, config: RunConfig) -> None:
        check_local_run_dir(config, self.name)

    def run(self, ctx: StageContext) -> None:
        fine_tune(ctx, self.name, training_rows(ctx), ctx.config.model, ctx.config.engrave.train)


def training_rows(ctx: StageContext) -> list[SelfAlignRow]:
    """The self_align rows sorted by id: the same data order however self_align was batched."""
    table = ctx.only_input().read("data", SelfAlignRow.SCHEMA)
    rows = sorted(SelfAlignRow.from_table(table), key=lambda r: r.id)
    if not rows:
        raise StageError("engrave: the self_align stage kept no rows to train on "
                         f"(see {ctx.only_input().root}/rejects)")
    return rows
