"""self_align: principle-driven self-alignment (Self-Align §3.2).

Each prompt becomes one chat document: our principles, the exemplars with internal thoughts, then
the query. The model writes its thoughts and its answer; the thoughts go to their own column and
every answer that fails a filter goes to the rejects table with the reason.
"""

from __future__ import annotations

import dataclasses
import hashlib
from concurrent.futures import Future
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
from dromedary_ray.engines.base import Engine, Generation, finished_groups
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
        docs = self.documents(prompts)
        thoughts: dict[int, Generation] = {}
        answers: dict[int, Future[Generation]] = {}
        # A row's answer starts as soon as its own thoughts are written, not when the batch's
        # slowest row's are: the engine never waits on the batch's long tail between phases.
        for ready in finished_groups(engine.submit(docs, self.thought_sampling, seeds)):
            thoughts.update(ready)
            follow = [i for i, gen in ready if self.continues(gen)]
            answers.update(zip(follow, engine.submit(
                [self.answer_document(docs[i], thoughts[i]) for i in follow], self.sampling,
                [seeds[i] for i in follow]), strict=True))
        return self.tables(prompts, thoughts, {i: f.result() for i, f in answers.items()})

    def documents(self, prompts: list[PromptRow]) -> list[str]:
        """Each row's phase-1 document: principles, exemplars, the query, the thoughts' lead."""
        lead = self.cfg.thoughts_lead
        return [self_align_prompt(self.tokenizer, self.principles, p.query) + lead
                for p in prompts]

    @staticmethod
    def continues(thoughts: Generation) -> bool:
        """Whether a row goes on to its answer: its thoughts were written and ended."""
        return not thoughts.error and thoughts.completions[0].finish_reason != "length"

    @staticmethod
    def answer_document(doc: str, thoughts: Generation) -> str:
        """Phase 2's document: phase 1's, its thoughts, the closed thoughts tag."""
        return f"{doc}{thoughts.completions[0].text}\n{THOUGHTS_CLOSE}\n"

    def tables(self, prompts: list[PromptRow], thoughts: dict[int, Generation],
               answers: dict[int, Generation]) -> BatchResult:
        """The batch's kept rows and rejects (in row order), from both phases' generations."""
        kept, rejects = [], []
        for i, prompt in enumerate(prompts):
            gen = thoughts[i]
            if i not in answers:
                rejects.append(self._thoughts_reject(prompt, gen))
                continue
            text = (self.cfg.thoughts_lead + gen.completions[0].text).strip()
            row = self._judge(prompt, text, answers[i], gen.prompt_tokens)
            (rejects if isinstance(row, RejectRow) else kept).append(row)
        gens = [*thoughts.values(), *answers.values()]
        completion_tokens = sum(len(c.token_ids) for g in gens for c in g.completions)
        return BatchResult(SelfAlignRow.to_table(kept), RejectRow.to_table(rejects),
                           sum(g.prompt_tokens for g in thoughts.values()), completion_tokens)

    def _thoughts_reject(self, prompt: PromptRow, gen: Generation) -> RejectRow:
        """The reject of a row whose thoughts did not lead to an answer."""
        if gen.error:
            return RejectRow(prompt.id, self.stage, error_reason(gen.error), gen.error)
        return RejectRow(prompt.id, self.stage, REJECT_THOUGHTS_RUNAWAY,
                         self.cfg.thoughts_lead + gen.completions[0].text)

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
    trains = False

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
            engines=ctx.engines,
            desc="self_align",
        )
        ctx.metrics.update(generation_metrics(summaries))


def generation_metrics(summaries: list[Any]) -> dict[str, Any]:
    """Token counts and engine time of a generation stage, from its batch summaries.

    `engine_seconds` is the wall time during which at least one batch was being generated:
    batches in flight overlap, so their own durations add up to more than the engines worked.
    """
    completion = sum(s.completion_tokens for s in summaries)
    return {
        "batches": len(summaries),
        "prompt_tokens": sum(s.prompt_tokens for s in summaries),
        "completion_tokens": completion,
        "engine_seconds": round(busy_seconds([(s.started, s.seconds) for s in summaries]), 2),
    }


def busy_seconds(spans: list[tuple[float, float]]) -> float:
    """Length of the union of the intervals [start, start + seconds]."""
    total, end = 0.0, float("-inf")
    for start, seconds in sorted(spans):
        stop = start + seconds
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total
