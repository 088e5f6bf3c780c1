"""self_align: principle-driven self-alignment (Self-Align §3.2).

Each prompt becomes one chat document: our principles, the exemplars with internal thoughts, then
the query. The model writes its thoughts and its answer; the thoughts go to their own column and
every answer that fails a filter goes to the rejects table with the reason.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import pyarrow as pa

from dromedary_ray.algos.parsing import (
    REJECT_ENGINE_ERROR,
    REJECT_PROMPT_TOO_LONG,
    REJECT_THOUGHTS_RUNAWAY,
    LeakDetector,
    judge_answer,
)
from dromedary_ray.config import RunConfig, SelfAlignConfig, resolve_path
from dromedary_ray.data.schemas import PromptRow, RejectRow, SelfAlignRow
from dromedary_ray.data.store import file_digest
from dromedary_ray.engines.base import Engine, Generation
from dromedary_ray.principles import PrincipleSet, load_principles
from dromedary_ray.prompts import THOUGHTS_CLOSE, chat_stop_strings, self_align_prompt
from dromedary_ray.runtime.generate import BatchResult
from dromedary_ray.stages.base import StageContext, generation_fingerprint, prompt_source


def row_seed(base: int, row_id: str) -> int:
    """A per-row sampling seed: the same row samples the same text in any batch or retry."""
    digest = hashlib.sha256(f"{base}:{row_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


class SelfAlignTask:
    """Prompt building, two-phase decoding and filtering for one engine worker.

    Phase 1 decodes the internal thoughts (one paragraph, stopped at the line end); phase 2
    closes the thoughts tag and decodes the answer. Forcing the structure this way keeps small
    models, which follow the exemplar pattern loosely, from skipping or never closing their
    thoughts; phase 2 re-reads the shared prefix from vLLM's prefix cache.
    """

    def __init__(self, tokenizer: Any, cfg: SelfAlignConfig, principles: PrincipleSet,
                 stage: str = "self_align"):
        self.tokenizer, self.cfg, self.principles, self.stage = tokenizer, cfg, principles, stage
        extra_stops = tuple(s for s in chat_stop_strings(tokenizer) if s not in cfg.sampling.stop)
        self.sampling = dataclasses.replace(cfg.sampling, stop=cfg.sampling.stop + extra_stops)
        self.thought_sampling = dataclasses.replace(
            cfg.sampling, max_new_tokens=cfg.max_thought_tokens,
            stop=("\n", THOUGHTS_CLOSE) + cfg.sampling.stop,  # the user's stops end any phase
        )
        exemplar_texts = [t for e in principles.exemplars for t in (e.query, e.thoughts, e.answer)]
        self.leak = LeakDetector(exemplar_texts, cfg.exemplar_leak_ngram)

    def seeds(self, ids: list[str]) -> list[int]:
        return [row_seed(self.cfg.sampling.seed, i) for i in ids]

    def process(self, engine: Engine, batch: pa.Table) -> BatchResult:
        prompts = PromptRow.from_table(batch)
        seeds = self.seeds([p.id for p in prompts])
        lead = self.cfg.thoughts_lead
        docs = [self_align_prompt(self.tokenizer, self.principles, p.query) + lead for p in prompts]
        thoughts_gen = engine.generate(docs, self.thought_sampling, seeds)
        rejects, follow = [], []
        for i, (prompt, gen) in enumerate(zip(prompts, thoughts_gen, strict=True)):
            if gen.error:
                rejects.append(RejectRow(prompt.id, self.stage, error_reason(gen.error), gen.error))
            elif gen.completions[0].finish_reason == "length":
                rejects.append(RejectRow(prompt.id, self.stage, REJECT_THOUGHTS_RUNAWAY,
                                         lead + gen.completions[0].text))
            else:
                follow.append(i)
        thoughts = {i: (lead + thoughts_gen[i].completions[0].text).strip() for i in follow}
        answer_gen = engine.generate(
            [f"{docs[i]}{thoughts_gen[i].completions[0].text}\n{THOUGHTS_CLOSE}\n" for i in follow],
            self.sampling, [seeds[i] for i in follow],
        )
        kept = []
        for i, gen in zip(follow, answer_gen, strict=True):
            row = self._judge(prompts[i], thoughts[i], gen, thoughts_gen[i].prompt_tokens)
            (rejects if isinstance(row, RejectRow) else kept).append(row)
        completion_tokens = sum(len(c.token_ids) for g in thoughts_gen + answer_gen
                                for c in g.completions)
        return BatchResult(SelfAlignRow.to_table(kept), RejectRow.to_table(rejects),
                           sum(g.prompt_tokens for g in thoughts_gen), completion_tokens)

    def _judge(self, prompt: PromptRow, thoughts: str, gen: Generation,
               prompt_tokens: int) -> SelfAlignRow | RejectRow:
        if gen.error:
            return RejectRow(prompt.id, self.stage, error_reason(gen.error), gen.error)
        comp = gen.completions[0]
        parsed = judge_answer(thoughts, comp.text, comp.finish_reason, self.leak,
                              self.cfg.min_answer_words, self.cfg.max_repeated_ngram_fraction)
        if parsed.reject_reason:
            detail = f"{thoughts}\n{THOUGHTS_CLOSE}\n{comp.text}"
            return RejectRow(prompt.id, self.stage, parsed.reject_reason, detail)
        return SelfAlignRow(
            id=prompt.id, query=prompt.query, thoughts=parsed.thoughts, answer=parsed.answer,
            prompt_tokens=prompt_tokens, completion_tokens=len(comp.token_ids),
            mean_logprob=comp.mean_logprob, finish_reason=comp.finish_reason,
        )


def stage_principles(cfg: SelfAlignConfig) -> PrincipleSet:
    """The principle set the prompts use: the file's, with the first `num_exemplars`."""
    principles = load_principles(cfg.principles_file)
    if cfg.num_exemplars is None:
        return principles
    return dataclasses.replace(principles, exemplars=principles.exemplars[: cfg.num_exemplars])


def error_reason(error: str) -> str:
    return REJECT_PROMPT_TOO_LONG if error.startswith("prompt_too_long") else REJECT_ENGINE_ERROR


class SelfAlignStage:
    name = "self_align"
    data_schema = SelfAlignRow.SCHEMA
    uses_ray = True

    def input_stages(self, config: RunConfig) -> tuple[str, ...]:
        return (prompt_source(config),)

    def fingerprint_payload(self, config: RunConfig) -> dict[str, Any]:
        return {
            "self_align": config.section("self_align"),
            "principles": file_digest(resolve_path(config.self_align.principles_file)),
            **generation_fingerprint(config),
        }

    def check(self, config: RunConfig) -> None:
        load_principles(config.self_align.principles_file)

    def run(self, ctx: StageContext) -> None:
        from dromedary_ray.models import resolve_model
        from dromedary_ray.runtime.generate import TaskSpec, run_generation

        cfg = ctx.config
        principles = stage_principles(cfg.self_align)
        prompts = ctx.only_input().read("data", PromptRow.SCHEMA)
        todo, resumed = ctx.store.pending(
            prompts, {"data": SelfAlignRow.SCHEMA, "rejects": RejectRow.SCHEMA})
        ctx.metrics["resumed_rows"] = resumed
        summaries = run_generation(
            todo,
            store=ctx.store,
            model_path=resolve_model(cfg.model, cfg.run_dir),
            engine_cfg=cfg.engine,
            task=TaskSpec(SelfAlignTask, {"cfg": cfg.self_align, "principles": principles}),
            seed=cfg.self_align.sampling.seed,
            desc="self_align",
        )
        ctx.metrics.update(generation_metrics(summaries))


def generation_metrics(summaries: list[Any]) -> dict[str, Any]:
    """Token counts and throughput of a generation stage, from its batch summaries."""
    completion = sum(s.completion_tokens for s in summaries)
    busy = sum(s.seconds for s in summaries)
    return {
        "batches": len(summaries),
        "prompt_tokens": sum(s.prompt_tokens for s in summaries),
        "completion_tokens": completion,
        "engine_seconds": round(busy, 2),
    }
