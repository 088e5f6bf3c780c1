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

from dromedary_ray.algos.parsing import REJECT_PROMPT_TOO_LONG, LeakDetector, parse_self_align
from dromedary_ray.config import RunConfig, SelfAlignConfig, resolve_path
from dromedary_ray.data.schemas import PromptRow, RejectRow, SelfAlignRow
from dromedary_ray.data.store import file_digest
from dromedary_ray.engines.base import Generation
from dromedary_ray.principles import PrincipleSet, load_principles
from dromedary_ray.prompts import chat_stop_strings, self_align_prompt
from dromedary_ray.stages.base import StageContext


def row_seed(base: int, row_id: str) -> int:
    """A per-row sampling seed: the same row samples the same text in any batch or retry."""
    digest = hashlib.sha256(f"{base}:{row_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


class SelfAlignTask:
    """Prompt building and output filtering for one engine worker (see runtime.generate)."""

    def __init__(self, tokenizer: Any, cfg: SelfAlignConfig, principles: PrincipleSet,
                 stage: str = "self_align"):
        self.tokenizer, self.cfg, self.principles, self.stage = tokenizer, cfg, principles, stage
        extra_stops = tuple(s for s in chat_stop_strings(tokenizer) if s not in cfg.sampling.stop)
        self.sampling = dataclasses.replace(cfg.sampling, stop=cfg.sampling.stop + extra_stops)
        exemplar_texts = [t for e in principles.exemplars for t in (e.query, e.thoughts, e.answer)]
        self.leak = LeakDetector(exemplar_texts, cfg.exemplar_leak_ngram)

    def build_prompts(self, batch: pa.Table) -> list[str]:
        return [self_align_prompt(self.tokenizer, self.principles, q)
                for q in batch["query"].to_pylist()]

    def seeds(self, ids: list[str]) -> list[int]:
        return [row_seed(self.cfg.sampling.seed, i) for i in ids]

    def postprocess(self, batch: pa.Table, gens: list[Generation]) -> tuple[pa.Table, pa.Table]:
        kept, rejects = [], []
        for prompt, gen in zip(PromptRow.from_table(batch), gens, strict=True):
            if gen.error:
                reason = REJECT_PROMPT_TOO_LONG if gen.error.startswith("prompt_too_long") else "error"
                rejects.append(RejectRow(prompt.id, self.stage, reason, gen.error))
                continue
            comp = gen.completions[0]
            parsed = parse_self_align(comp.text, comp.finish_reason, self.leak,
                                      self.cfg.min_answer_words, self.cfg.max_repeated_ngram_fraction)
            if parsed.reject_reason:
                rejects.append(RejectRow(prompt.id, self.stage, parsed.reject_reason, comp.text))
                continue
            mean_lp = sum(comp.logprobs) / len(comp.logprobs) if comp.logprobs else 0.0
            kept.append(SelfAlignRow(
                id=prompt.id, query=prompt.query, thoughts=parsed.thoughts, answer=parsed.answer,
                prompt_tokens=gen.prompt_tokens, completion_tokens=len(comp.token_ids),
                mean_logprob=mean_lp, finish_reason=comp.finish_reason,
            ))
        return SelfAlignRow.to_table(kept), RejectRow.to_table(rejects)


class SelfAlignStage:
    name = "self_align"
    inputs = ("seeds",)
    data_schema = SelfAlignRow.SCHEMA

    def fingerprint_payload(self, config: RunConfig) -> dict[str, Any]:
        engine = config.engine
        return {
            "self_align": config.section("self_align"),
            "principles": file_digest(resolve_path(config.self_align.principles_file)),
            "model": config.model,
            "engine": {"backend": engine.backend, "dtype": engine.dtype,
                       "max_model_len": engine.max_model_len},
        }

    def run(self, ctx: StageContext) -> None:
        from dromedary_ray.models import resolve_model
        from dromedary_ray.runtime.generate import TaskSpec, run_generation

        cfg = ctx.config
        principles = load_principles(cfg.self_align.principles_file)
        prompts = ctx.inputs["seeds"].read("data", PromptRow.SCHEMA)
        done = ctx.store.done_ids({"data": SelfAlignRow.SCHEMA, "rejects": RejectRow.SCHEMA})
        todo = prompts.filter(pa.array([i not in done for i in prompts["id"].to_pylist()],
                                       type=pa.bool_()))
        ctx.metrics["resumed_rows"] = len(done)
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
