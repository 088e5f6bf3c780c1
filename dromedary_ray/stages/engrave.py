"""engrave: principle engraving (Self-Align §3.3).

Fine-tune the base model on the self_align stage's (query, answer) pairs with the principles,
the exemplars and the internal thoughts removed from the prompt, so that the model answers in
the principled way with no principles in its context. Training runs on Ray Train with DeepSpeed
(`runtime/train.py`); the model goes to `<run>/engrave/model/`, a one-row summary to the data
table, records too long to train on to the rejects table, and the loss curve (one JSON line per
step) to `<run>/engrave/loss_curve.jsonl`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dromedary_ray.config import RunConfig
from dromedary_ray.data.schemas import RejectRow, SelfAlignRow
from dromedary_ray.data.train_schemas import TrainSummaryRow
from dromedary_ray.errors import StageError
from dromedary_ray.stages.base import StageContext

REJECT_PROMPT_TOO_LONG = "prompt_too_long"


class EngraveStage:
    name = "engrave"
    data_schema = TrainSummaryRow.SCHEMA
    uses_ray = True

    def input_stages(self, config: RunConfig) -> tuple[str, ...]:
        return ("self_align",)

    def fingerprint_payload(self, config: RunConfig) -> dict[str, Any]:
        return {"engrave": config.section("engrave"), "model": config.model}

    def check(self, config: RunConfig) -> None:
        if "://" in config.run_dir:
            raise StageError(
                f"engrave trains into a local folder, but run_dir is {config.run_dir!r}; "
                "use a local (or mounted shared) run directory for recipes that train"
            )

    def run(self, ctx: StageContext) -> None:
        from dromedary_ray.models import resolve_model
        from dromedary_ray.runtime.train import train_sft

        if not ctx.store.is_local:
            raise StageError(f"engrave needs a local run directory, got {ctx.store.run_dir!r}")
        rows = training_rows(ctx)
        cfg = ctx.config
        train = cfg.engrave.train
        stage_dir = Path(ctx.store.root)
        result = train_sft(
            [{"query": r.query, "answer": r.answer} for r in rows],
            base_model_path=resolve_model(cfg.model, cfg.run_dir),
            out_dir=ctx.store.model_dir,
            cfg=train,
            metrics_path=str(stage_dir / "train_log.jsonl"),
            run_name=self.name,
        )
        write_loss_curve(stage_dir / "loss_curve.jsonl", result.loss_curve)
        rejects = [
            RejectRow(rows[pos].id, self.name, REJECT_PROMPT_TOO_LONG,
                      f"{n} prompt tokens leave no room for the answer in max_seq_len "
                      f"{train.max_seq_len}")
            for pos, n in result.dropped_prompt_too_long
        ]
        summary = TrainSummaryRow(
            id=self.name, base_model=cfg.model, model_dir=result.model_dir, method=train.method,
            merged=train.method == "full" or train.merge_lora, examples=result.examples,
            dropped_prompt_too_long=len(rejects), truncated=result.truncated,
            steps=result.steps, first_loss=result.first_loss, final_loss=result.final_loss,
            tokens_per_second=result.tokens_per_second, seconds=result.seconds,
            resumed_from_step=result.resumed_from_step,
            trainable_params=result.trainable_params, total_params=result.total_params,
        )
        ctx.store.write_table(TrainSummaryRow.to_table([summary]), RejectRow.to_table(rejects))
        ctx.metrics.update({
            "examples": result.examples, "steps": result.steps,
            "first_loss": round(result.first_loss, 4), "final_loss": round(result.final_loss, 4),
            # `train_tokens_per_second`, not `tokens_per_second`: the driver derives the latter
            # from generated tokens.
            "train_tokens_per_second": round(result.tokens_per_second, 1),
            "resumed_from_step": result.resumed_from_step,
            "trainable_params": result.trainable_params,
        })


def training_rows(ctx: StageContext) -> list[SelfAlignRow]:
    """The self_align rows sorted by id: the same data order however self_align was batched."""
    table = ctx.only_input().read("data", SelfAlignRow.SCHEMA)
    rows = sorted(SelfAlignRow.from_table(table), key=lambda r: r.id)
    if not rows:
        raise StageError("engrave: the self_align stage kept no rows to train on "
                         f"(see {ctx.only_input().root}/rejects)")
    return rows


def write_loss_curve(path: Path, curve: list[tuple[int, float]]) -> None:
    lines = [json.dumps({"step": step, "loss": loss}) for step, loss in curve]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(f"{line}\n" for line in lines))
    tmp.replace(path)
