"""verbose_clone: context distillation of a verbose system prompt (Self-Align §3.4).

The engraved model answers the recipe's prompts under our verbose-answer system prompt; answers
that pass the filters become the stage's data table, and a second fine-tune on them (without the
system prompt) produces the stage's model. Generation commits shards as it goes and training
checkpoints through Ray Train, so an interrupted stage resumes in either phase.
"""

from __future__ import annotations

from typing import Any

from dromedary_ray.config import RunConfig, resolve_path
from dromedary_ray.data.schemas import AnswerRow, PromptRow, RejectRow
from dromedary_ray.data.store import file_digest
from dromedary_ray.principles import load_system_prompt
from dromedary_ray.stages.answer import AnswerTask
from dromedary_ray.stages.base import StageContext, generation_fingerprint, prompt_source
from dromedary_ray.stages.self_align import generation_metrics


class VerboseCloneStage:
    name = "verbose_clone"
    data_schema = AnswerRow.SCHEMA
    uses_ray = True
    trains = True

    def input_stages(self, config: RunConfig) -> tuple[str, ...]:
        return (prompt_source(config), "engrave")

    def check(self, config: RunConfig) -> None:
        load_system_prompt(config.verbose_clone.system_prompt_file)

    def fingerprint_payload(self, config: RunConfig) -> dict[str, Any]:
        return {
            "verbose_clone": config.section("verbose_clone"),
            "system_prompt": file_digest(resolve_path(config.verbose_clone.system_prompt_file)),
            **generation_fingerprint(config),
        }

    def run(self, ctx: StageContext) -> None:
        from dromedary_ray.models import resolve_model
        from dromedary_ray.runtime.generate import TaskSpec, run_generation
        from dromedary_ray.runtime.train import train_sft

        cfg = ctx.config
        engraved = resolve_model("run:engrave", cfg.run_dir)
        prompts = ctx.inputs[prompt_source(cfg)].read("data", PromptRow.SCHEMA)
        todo, resumed = ctx.store.pending(
            prompts, {"data": AnswerRow.SCHEMA, "rejects": RejectRow.SCHEMA})
        system_prompt = load_system_prompt(cfg.verbose_clone.system_prompt_file)
        summaries = run_generation(
            todo, store=ctx.store, model_path=engraved, engine_cfg=cfg.engine,
            task=TaskSpec(AnswerTask, {
                "sampling": cfg.verbose_clone.sampling, "system_prompt": system_prompt,
                "min_answer_words": cfg.verbose_clone.min_answer_words,
                "max_repeated_ngram_fraction": cfg.verbose_clone.max_repeated_ngram_fraction,
                "stage": self.name}),
            engines=ctx.engines, desc="verbose_clone",
        )
        ctx.metrics.update(generation_metrics(summaries), resumed_rows=resumed)
        if ctx.engines is not None:
            ctx.engines.close()  # the fine-tune below needs the engines' cores and memory
        answers = AnswerRow.from_table(ctx.store.read("data", AnswerRow.SCHEMA))
        if not answers:
            raise_no_data(self.name)
        base = resolve_model(cfg.model, cfg.run_dir)
        result = train_sft(
            [{"query": a.query, "answer": a.answer} for a in answers],
            base_model_path=engraved if cfg.verbose_clone.init_from == "engraved" else base,
            out_dir=ctx.store.model_dir,
            cfg=cfg.verbose_clone.train,
            metrics_path=f"{ctx.store.root}/train_metrics.jsonl",
        )
        ctx.metrics["train"] = train_metrics(result)


def raise_no_data(stage: str) -> None:
    from dromedary_ray.errors import StageError

    raise StageError(f"{stage}: every generated answer was rejected; nothing to fine-tune on "
                     f"(see {stage}/rejects for the reasons)")


def train_metrics(result: Any) -> dict[str, Any]:
    """The manifest's view of a fine-tune: loss at both ends, steps, speed, resume point."""
    return {k: getattr(result, k) for k in ("first_loss", "final_loss", "steps",
                                            "tokens_per_second", "seconds", "resumed_from_step")}
