"""sft: I-SHEEP step (e): fine-tune on the pairs the model graded highly.

`fine_tune` is also the body of engrave: train on (id, query, answer) rows with Ray Train and
DeepSpeed, write the model to `<stage>/model/`, a one-row summary as the data table, records too
long to train on as rejects, and the loss curve to `<stage>/loss_curve.jsonl`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dromedary_ray.algos.parsing import REJECT_PROMPT_TOO_LONG
from dromedary_ray.config import RunConfig, TrainConfig
from dromedary_ray.data.schemas import AssessRow, RejectRow
from dromedary_ray.data.train_schemas import TrainSummaryRow
from dromedary_ray.errors import StageError
from dromedary_ray.stages.base import StageContext


def check_local_run_dir(config: RunConfig, stage: str) -> None:
    if "://" in config.run_dir:
        raise StageError(
            f"{stage} trains into a local folder, but run_dir is {config.run_dir!r}; "
            "use a local (or mounted shared) run directory for recipes that train"
        )


def fine_tune(ctx: StageContext, stage: str, rows: list[Any], base_spec: str,
              train: TrainConfig) -> None:
    """Fine-tune `base_spec` on `rows` (each with id, query, answer) and tabulate the result."""
    from dromedary_ray.models import resolve_model
    from dromedary_ray.runtime.train import train_sft

    if not ctx.store.is_local:
        raise StageError(f"{stage} needs a local run directory, got {ctx.store.run_dir!r}")
    stage_dir = Path(ctx.store.root)
    result = train_sft(
        [{"query": r.query, "answer": r.answer} for r in rows],
        base_model_path=resolve_model(base_spec, ctx.config.run_dir),
        out_dir=ctx.store.model_dir,
        cfg=train,
        metrics_path=str(stage_dir / "train_log.jsonl"),
        run_name=stage,
    )
    write_loss_curve(stage_dir / "loss_curve.jsonl", result.loss_curve)
    rejects = [
        RejectRow(rows[pos].id, stage, REJECT_PROMPT_TOO_LONG,
                  f"{n} prompt tokens leave no room for the answer in max_seq_len "
                  f"{train.max_seq_len}")
        for pos, n in result.dropped_prompt_too_long
    ]
    summary = TrainSummaryRow(
        id=stage, base_model=base_spec, model_dir=result.model_dir, method=train.method,
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


def write_loss_curve(path: Path, curve: list[tuple[int, float]]) -> None:
    lines = [json.dumps({"step": step, "loss": loss}) for step, loss in curve]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(f"{line}\n" for line in lines))
    tmp.replace(path)


class SftStage:
    name = "sft"
    data_schema = TrainSummaryRow.SCHEMA
    uses_ray = True
    trains = True

    def input_stages(self, config: RunConfig) -> tuple[str, ...]:
        return ("assess",)

    def fingerprint_payload(self, config: RunConfig) -> dict[str, Any]:
        return {"train": config.section("isheep")["train"], "init": self.init_model(config)}

    def check(self, config: RunConfig) -> None:
        check_local_run_dir(config, self.name)

    @staticmethod
    def init_model(config: RunConfig) -> str:
        """The model fine-tuning starts from: the base (I-SHEEP's default) or this iteration's."""
        isheep = config.isheep
        return (isheep.base_model or config.model) if isheep.init_from == "base" else config.model

    def run(self, ctx: StageContext) -> None:
        graded = AssessRow.from_table(ctx.only_input().read("data", AssessRow.SCHEMA))
        rows = sorted((r for r in graded if r.kept), key=lambda r: r.id)
        if not rows:
            raise StageError(
                f"sft: no graded pair passed the threshold {ctx.config.isheep.assess.threshold} "
                f"({len(graded)} graded; see {ctx.only_input().root}); lower "
                "isheep.assess.threshold or make more prompts")
        fine_tune(ctx, self.name, rows, self.init_model(ctx.config), ctx.config.isheep.train)
