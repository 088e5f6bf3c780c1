"""answer: the model answers the recipe's prompts as plain chat turns (I-SHEEP step b).

`AnswerTask` is also the generation half of verbose_clone, which answers under a system prompt:
one prompt per row, one sampled answer, the same quality filters as self_align, and every
dropped answer in the rejects table with its reason.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import Future
from typing import Any

import pyarrow as pa

from dromedary_ray.algos.parsing import LeakDetector, judge_answer
from dromedary_ray.config import AnswerConfig, RunConfig, SamplingConfig, resolve_path
from dromedary_ray.data.schemas import AnswerRow, PromptRow, RejectRow
from dromedary_ray.data.store import file_digest
from dromedary_ray.engines.base import Engine, Generation, results
from dromedary_ray.principles import load_system_prompt
from dromedary_ray.prompts import chat_stop_strings, render_chat
from dromedary_ray.runtime.generate import BatchResult
from dromedary_ray.stages.base import StageContext, generation_fingerprint, prompt_source
from dromedary_ray.stages.self_align import error_reason, generation_metrics, row_seed


class AnswerTask:
    """One engine worker's share: answer each prompt (under a system prompt, if any), filter."""

    def __init__(self, tokenizer: Any, sampling: SamplingConfig, system_prompt: str | None,
                 min_answer_words: int, max_repeated_ngram_fraction: float, stage: str):
        self.tokenizer, self.stage, self.system_prompt = tokenizer, stage, system_prompt
        self.min_words, self.max_repeat = min_answer_words, max_repeated_ngram_fraction
        stops = sampling.stop + tuple(s for s in chat_stop_strings(tokenizer)
                                      if s not in sampling.stop)
        self.sampling = dataclasses.replace(sampling, stop=stops)
        # An answer that recites the system prompt has learned the prompt, not the style.
        self.leak = LeakDetector([system_prompt] if system_prompt else [], n=8)

    def render(self, query: str) -> str:
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return render_chat(self.tokenizer, [*system, {"role": "user", "content": query}])

    def process(self, engine: Engine, batch: pa.Table) -> BatchResult:
        prompts = PromptRow.from_table(batch)
        return self.judge(prompts, results(self.submit(engine, prompts)))

    def submit(self, engine: Engine, prompts: list[PromptRow]) -> list[Future[Generation]]:
        seeds = [row_seed(self.sampling.seed, p.id) for p in prompts]
        return engine.submit([self.render(p.query) for p in prompts], self.sampling, seeds)

    def judge(self, prompts: list[PromptRow], gens: list[Generation]) -> BatchResult:
        """The batch's tables: each answer through the quality filters."""
        kept, rejects = [], []
        for prompt, gen in zip(prompts, gens, strict=True):
            if gen.error:
                rejects.append(RejectRow(prompt.id, self.stage, error_reason(gen.error), gen.error))
                continue
            comp = gen.completions[0]
            verdict = judge_answer(None, comp.text, comp.finish_reason, self.leak,
                                   self.min_words, self.max_repeat)
            if verdict.reject_reason:
                rejects.append(RejectRow(prompt.id, self.stage, verdict.reject_reason, comp.text))
                continue
            kept.append(AnswerRow(prompt.id, prompt.query, verdict.answer, gen.prompt_tokens,
                                  len(comp.token_ids), comp.mean_logprob, comp.finish_reason))
        tokens = sum(len(c.token_ids) for g in gens for c in g.completions)
        return BatchResult(AnswerRow.to_table(kept), RejectRow.to_table(rejects),
                           sum(g.prompt_tokens for g in gens), tokens)


def answer_task_kwargs(cfg: AnswerConfig, stage: str) -> dict[str, Any]:
    system = load_system_prompt(cfg.system_prompt_file) if cfg.system_prompt_file else None
    return {"sampling": cfg.sampling, "system_prompt": system,
            "min_answer_words": cfg.min_answer_words,
            "max_repeated_ngram_fraction": cfg.max_repeated_ngram_fraction, "stage": stage}


class AnswerStage:
    name = "answer"
    data_schema = AnswerRow.SCHEMA
    uses_ray = True
    trains = False

    def input_stages(self, config: RunConfig) -> tuple[str, ...]:
        return (prompt_source(config),)

    def check(self, config: RunConfig) -> None:
        if config.isheep.answer.system_prompt_file:
            load_system_prompt(config.isheep.answer.system_prompt_file)

    def fingerprint_payload(self, config: RunConfig) -> dict[str, Any]:
        cfg = config.isheep.answer
        system = file_digest(resolve_path(cfg.system_prompt_file)) \
            if cfg.system_prompt_file else None
        return {"answer": dataclasses.asdict(cfg), "system_prompt": system,
                **generation_fingerprint(config)}

    def run(self, ctx: StageContext) -> None:
        from dromedary_ray.models import resolve_model
        from dromedary_ray.runtime.generate import TaskSpec, run_generation

        cfg = ctx.config
        prompts = ctx.only_input().read("data", PromptRow.SCHEMA)
        todo, resumed = ctx.store.pending(
            prompts, {"data": AnswerRow.SCHEMA, "rejects": RejectRow.SCHEMA})
        summaries = run_generation(
            todo, store=ctx.store, model_path=resolve_model(cfg.model, cfg.run_dir),
            engine_cfg=cfg.engine,
            task=TaskSpec(AnswerTask, answer_task_kwargs(cfg.isheep.answer, self.name)),
            engines=ctx.engines, desc="answer",
        )
        ctx.metrics.update(generation_metrics(summaries), resumed_rows=resumed)
