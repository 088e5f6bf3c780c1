"""assess: I-SHEEP self-assessment (Liang et al. 2024 §2.3): the model grades its own answers.

Every (prompt, answer) pair from the answer stage is graded once per rubric (answer quality,
instruction following; `principles/isheep_rubrics.yaml`). The data table holds every graded
pair with its scores and whether it passed the filter (every score above the threshold), so the
score histograms see all of them; a grade that cannot be read is a reject with the reason.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pyarrow as pa

from dromedary_ray.algos.assess import (
    expected_score,
    first_digits,
    histogram,
    keep_pair,
    needs_second_digit,
    parse_grade,
)
from dromedary_ray.algos.parsing import REJECT_PROMPT_TOO_LONG
from dromedary_ray.config import AssessConfig, RunConfig, resolve_path
from dromedary_ray.data.schemas import AnswerRow, AssessRow, RejectRow
from dromedary_ray.data.store import file_digest
from dromedary_ray.engines.base import Engine, fitting_prompts
from dromedary_ray.principles import Rubric, RubricSet, load_rubrics
from dromedary_ray.prompts import render_chat
from dromedary_ray.runtime.generate import BatchResult
from dromedary_ray.stages.base import StageContext, generation_fingerprint
from dromedary_ray.stages.self_align import error_reason, generation_metrics, row_seed

Grades = list[tuple[float | None, str, str | None]]  # (score, grade text, reject reason)


class AssessTask:
    """Grades one batch of answers under every rubric, by sampled text or by expected score."""

    def __init__(self, tokenizer: Any, cfg: AssessConfig, rubric_set: RubricSet,
                 stage: str = "assess"):
        self.tokenizer, self.cfg, self.stage = tokenizer, cfg, stage
        self.scale = (rubric_set.min_score, rubric_set.max_score)
        self.lead = rubric_set.answer_lead
        self.rubrics: tuple[Rubric, ...] = rubric_set.pick(cfg.rubrics, cfg.rubrics_file)

    def prompt(self, rubric: Rubric, row: AnswerRow) -> str:
        user = {"role": "user", "content": rubric.render(row.query, row.answer)}
        return render_chat(self.tokenizer, [user], prefill=self.lead)

    def process(self, engine: Engine, batch: pa.Table) -> BatchResult:
        rows = AnswerRow.from_table(batch)
        prompts = [self.prompt(r, row) for row in rows for r in self.rubrics]
        ids = [f"{row.id}/{r.name}" for row in rows for r in self.rubrics]
        if self.cfg.method == "generate":
            grades, prompt_tokens, completion_tokens = self._sampled(engine, prompts, ids)
        else:
            grades, prompt_tokens = self._expected(engine, prompts)
            completion_tokens = 0
        kept, rejects = [], []
        k = len(self.rubrics)
        for i, row in enumerate(rows):
            row_grades = grades[i * k:(i + 1) * k]
            failed = [(r, g) for r, g in zip(self.rubrics, row_grades, strict=True) if g[2]]
            if failed:
                rubric, (_, text, reason) = failed[0]
                rejects.append(RejectRow(row.id, self.stage, reason, f"{rubric.name}: {text}"))
                continue
            scores = [float(g[0]) for g in row_grades]
            kept.append(AssessRow(
                id=row.id, query=row.query, answer=row.answer, answer_tokens=row.completion_tokens,
                rubrics=[r.name for r in self.rubrics], scores=scores,
                grades=[g[1] for g in row_grades], kept=keep_pair(scores, self.cfg.threshold)))
        return BatchResult(AssessRow.to_table(kept), RejectRow.to_table(rejects), prompt_tokens,
                           completion_tokens)

    def _sampled(self, engine: Engine, prompts: list[str],
                 ids: list[str]) -> tuple[Grades, int, int]:
        seeds = [row_seed(self.cfg.sampling.seed, i) for i in ids]
        gens = engine.generate(prompts, self.cfg.sampling, seeds)
        grades: Grades = []
        for gen in gens:
            if gen.error:
                grades.append((None, gen.error, error_reason(gen.error)))
                continue
            text = gen.completions[0].text
            grade = parse_grade(text, *self.scale)
            grades.append((grade.score, text, grade.reject_reason))
        completion = sum(len(c.token_ids) for g in gens for c in g.completions)
        return grades, sum(g.prompt_tokens for g in gens), completion

    def _expected(self, engine: Engine, prompts: list[str]) -> tuple[Grades, int]:
        """The grade's digit distribution read, not sampled: one request per prompt (two steps
        on a 1-10 scale, the second reading p("0") after a forced "1"); no text is made."""
        from dromedary_ray.eval.loglik import next_token_logprobs, next_two_logprobs

        fits, lengths = fitting_prompts(self.tokenizer, prompts, engine.max_model_len, 3)
        grades: Grades = [(None, f"{n} prompt tokens exceed max_model_len "
                           f"{engine.max_model_len}", REJECT_PROMPT_TOO_LONG) for n in lengths]
        if not fits:
            return grades, 0
        digits = first_digits(*self.scale)
        todo = [prompts[i] for i in fits]
        if needs_second_digit(self.scale[1]):
            reads = [(a, b["0"]) for a, b in next_two_logprobs(engine, todo, digits, "1", ["0"])]
        else:
            reads = [(a, None) for a in next_token_logprobs(engine, todo, digits)]
        for i, (first, zero) in zip(fits, reads, strict=True):
            grades[i] = (expected_score(first, zero, *self.scale), "", None)
        return grades, sum(lengths[i] for i in fits)


def assess_metrics(table: pa.Table, rubric_set: RubricSet) -> dict[str, Any]:
    """Kept fraction, mean answer length and a score histogram per rubric."""
    rows = AssessRow.from_table(table)
    out: dict[str, Any] = {"graded": len(rows), "kept": sum(r.kept for r in rows)}
    out["kept_fraction"] = round(out["kept"] / len(rows), 4) if rows else 0.0
    out["mean_answer_tokens"] = round(sum(r.answer_tokens for r in rows) / len(rows), 2) \
        if rows else 0.0
    names = rows[0].rubrics if rows else []
    for j, name in enumerate(names):
        scores = [r.scores[j] for r in rows]
        out[f"{name}_mean"] = round(sum(scores) / len(scores), 3)
        out[f"{name}_hist"] = histogram(scores, rubric_set.min_score, rubric_set.max_score)
    return out


class AssessStage:
    name = "assess"
    data_schema = AssessRow.SCHEMA
    uses_ray = True
    trains = False

    def input_stages(self, config: RunConfig) -> tuple[str, ...]:
        return ("answer",)

    def check(self, config: RunConfig) -> None:
        cfg = config.isheep.assess
        load_rubrics(cfg.rubrics_file).pick(cfg.rubrics, cfg.rubrics_file)

    def fingerprint_payload(self, config: RunConfig) -> dict[str, Any]:
        cfg = config.isheep.assess
        return {"assess": dataclasses.asdict(cfg),
                "rubrics": file_digest(resolve_path(cfg.rubrics_file)),
                **generation_fingerprint(config)}

    def run(self, ctx: StageContext) -> None:
        from dromedary_ray.models import resolve_model
        from dromedary_ray.runtime.generate import TaskSpec, run_generation

        cfg = ctx.config
        acfg = cfg.isheep.assess
        rubric_set = load_rubrics(acfg.rubrics_file)
        answers = ctx.only_input().read("data", AnswerRow.SCHEMA)
        todo, resumed = ctx.store.pending(
            answers, {"data": AssessRow.SCHEMA, "rejects": RejectRow.SCHEMA})
        summaries = run_generation(
            todo, store=ctx.store, model_path=resolve_model(cfg.model, cfg.run_dir),
            engine_cfg=cfg.engine,
            task=TaskSpec(AssessTask, {"cfg": acfg, "rubric_set": rubric_set}),
            engines=ctx.engines, desc="assess",
        )
        ctx.metrics.update(generation_metrics(summaries), resumed_rows=resumed)
        ctx.metrics.update(assess_metrics(ctx.store.read("data", AssessRow.SCHEMA), rubric_set))
