"""preferences: SALMON's synthetic preferences (Sun et al. 2023, §3.1).

Two phases, each a generation pass of the runner that commits shards and resumes:

1. **pairs** (`<stage>/pairs/`): the SFT policy answers every prompt twice, with two different
   per-row seeds; a pair where either answer fails the usual filters is a reject.
2. **judging** (the stage's own table): each pair is compared under a few principles drawn by
   the prompt's type, one principle at a time. The judging prompt ends where the next token is
   the letter of the better reply, so one forward pass per order gives log p("A") and
   log p("B"), and no judgment text is sampled. Both orders, (A, B) and (B, A), are scored; a
   judgment counts as consistent only where they agree (`algos.salmon_prefs.judge_score`).
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import pyarrow as pa

from dromedary_ray.algos.parsing import REJECT_PROMPT_TOO_LONG
from dromedary_ray.algos.salmon_prefs import judge_score
from dromedary_ray.config import PreferencesConfig, RunConfig, resolve_path
from dromedary_ray.data.salmon_schemas import PreferenceRow, ResponsePairRow
from dromedary_ray.data.schemas import AnswerRow, PromptRow, RejectRow
from dromedary_ray.data.store import StageStore, file_digest
from dromedary_ray.engines.base import Engine, fitting_prompts
from dromedary_ray.runtime.generate import BatchResult
from dromedary_ray.salmon_principles import (
    SalmonPrincipleSet,
    classify_prompt,
    load_salmon_principles,
    render_judge_prompt,
    sample_principles,
)
from dromedary_ray.stages.answer import AnswerTask
from dromedary_ray.stages.base import StageContext, generation_fingerprint, prompt_source, sft_stage
from dromedary_ray.stages.self_align import generation_metrics, row_seed

REJECT_IDENTICAL = "identical_responses"  # nothing to prefer between two equal answers
SECOND_SEED_OFFSET = 1_000_003  # response B's sampling seed: far from A's


class PairTask:
    """Phase 1: two filtered answers per prompt from the policy, and the prompt's type."""

    def __init__(self, tokenizer: Any, cfg: PreferencesConfig, pset: SalmonPrincipleSet,
                 stage: str = "preferences"):
        self.pset, self.stage = pset, stage
        common = dict(tokenizer=tokenizer, system_prompt=None,
                      min_answer_words=cfg.min_answer_words,
                      max_repeated_ngram_fraction=cfg.max_repeated_ngram_fraction, stage=stage)
        second = dataclasses.replace(cfg.sampling, seed=cfg.sampling.seed + SECOND_SEED_OFFSET)
        self.tasks = (AnswerTask(sampling=cfg.sampling, **common),
                      AnswerTask(sampling=second, **common))

    def process(self, engine: Engine, batch: pa.Table) -> BatchResult:
        prompts = PromptRow.from_table(batch)
        sides = [t.submit(engine, prompts) for t in self.tasks]  # both answers at once
        results = [t.judge(prompts, [f.result() for f in futures])
                   for t, futures in zip(self.tasks, sides, strict=True)]
        answers = [{a.id: a for a in AnswerRow.from_table(r.kept)} for r in results]
        rejected = {}
        for side, r in zip("ab", results, strict=True):
            for rej in RejectRow.from_table(r.rejects):
                rejected.setdefault(rej.id, dataclasses.replace(
                    rej, reason=rej.reason, detail=f"response {side}: {rej.detail}"))
        kept = []
        for prompt in prompts:
            if prompt.id in rejected:
                continue
            a, b = answers[0][prompt.id], answers[1][prompt.id]
            if a.answer.strip() == b.answer.strip():
                rejected[prompt.id] = RejectRow(prompt.id, self.stage, REJECT_IDENTICAL, a.answer)
                continue
            kept.append(ResponsePairRow(prompt.id, classify_prompt(prompt.query, self.pset),
                                        prompt.query, a.answer, b.answer))
        rejects = RejectRow.to_table(list(rejected.values()))
        return BatchResult(ResponsePairRow.to_table(kept), rejects,
                           sum(r.prompt_tokens for r in results),
                           sum(r.completion_tokens for r in results))


class JudgeTask:
    """Phase 2: each pair under a few single principles, both orders, by choice-token log-probs."""

    def __init__(self, tokenizer: Any, cfg: PreferencesConfig, pset: SalmonPrincipleSet,
                 stage: str = "preferences"):
        self.tokenizer, self.cfg, self.pset, self.stage = tokenizer, cfg, pset, stage

    def principles(self, pair: ResponsePairRow) -> list[Any]:
        rng = random.Random(row_seed(self.cfg.seed, pair.id))
        return sample_principles(self.pset, pair.prompt_type, self.cfg.principles_per_pair, rng)

    def process(self, engine: Engine, batch: pa.Table) -> BatchResult:
        from dromedary_ray.eval.loglik import next_token_logprobs

        pairs = ResponsePairRow.from_table(batch)
        jobs = [(pair, p) for pair in pairs for p in self.principles(pair)]
        prompts = [text for pair, p in jobs for text in (
            render_judge_prompt(self.pset, p, pair.prompt, pair.response_a, pair.response_b),
            render_judge_prompt(self.pset, p, pair.prompt, pair.response_b, pair.response_a))]
        fits, lengths = fitting_prompts(self.tokenizer, prompts, engine.max_model_len, 2)
        too_long = {jobs[i // 2][0].id: lengths[i] for i in set(range(len(prompts))) - set(fits)}
        todo = [j for j, (pair, _) in enumerate(jobs) if pair.id not in too_long]
        logps = next_token_logprobs(engine, [prompts[2 * j + o] for j in todo for o in (0, 1)],
                                    list(self.pset.choices)) if todo else []
        kept = []
        for n, j in enumerate(todo):
            pair, principle = jobs[j]
            s = judge_score(logps[2 * n], logps[2 * n + 1], tuple(self.pset.choices))
            kept.append(PreferenceRow(
                id=f"{pair.id}/{principle.name}", pair_id=pair.id, prompt_type=pair.prompt_type,
                prompt=pair.prompt, response_a=pair.response_a, response_b=pair.response_b,
                principle=principle.name, forward=s.forward, backward=s.backward, score=s.score,
                consistent=s.consistent))
        rejects = [RejectRow(pid, self.stage, REJECT_PROMPT_TOO_LONG,
                             f"a judging prompt of {n} tokens leaves no room in max_model_len "
                             f"{engine.max_model_len}") for pid, n in too_long.items()]
        return BatchResult(PreferenceRow.to_table(kept), RejectRow.to_table(rejects),
                           sum(lengths[2 * j] + lengths[2 * j + 1] for j in todo), 0)


class PreferencesStage:
    name = "preferences"
    data_schema = PreferenceRow.SCHEMA
    uses_ray = True
    trains = False

    def input_stages(self, config: RunConfig) -> tuple[str, ...]:
        return (prompt_source(config), sft_stage(config))

    def check(self, config: RunConfig) -> None:
        load_salmon_principles(config.preferences.principles_file)

    def fingerprint_payload(self, config: RunConfig) -> dict[str, Any]:
        cfg = config.preferences
        return {"preferences": dataclasses.asdict(cfg),
                "principles": file_digest(resolve_path(cfg.principles_file)),
                **generation_fingerprint(config)}

    @staticmethod
    def judge_model(config: RunConfig) -> str:
        judge = config.preferences.judge
        if judge == "policy":
            return f"run:{sft_stage(config)}"
        return config.model if judge == "base" else judge

    def run(self, ctx: StageContext) -> None:
        from dromedary_ray.models import resolve_model
        from dromedary_ray.runtime.generate import TaskSpec, run_generation

        cfg, pcfg = ctx.config, ctx.config.preferences
        pset = load_salmon_principles(pcfg.principles_file)
        policy = resolve_model(f"run:{sft_stage(cfg)}", cfg.run_dir)
        pair_store = StageStore(cfg.run_dir, f"{self.name}/pairs")
        pair_store.drop_uncommitted()
        prompts = ctx.inputs[prompt_source(cfg)].read("data", PromptRow.SCHEMA)
        todo, _ = pair_store.pending(
            prompts, {"data": ResponsePairRow.SCHEMA, "rejects": RejectRow.SCHEMA})
        pair_summaries = run_generation(
            todo, store=pair_store, model_path=policy, engine_cfg=cfg.engine,
            task=TaskSpec(PairTask, {"cfg": pcfg, "pset": pset}), engines=ctx.engines,
            desc="preferences: pairs")
        pairs = pair_store.read("data", ResponsePairRow.SCHEMA)
        todo = pairs.filter(pa.array([i not in self._judged(ctx.store)
                                      for i in pairs["id"].to_pylist()], type=pa.bool_()))
        judge_summaries = run_generation(
            todo, store=ctx.store, model_path=resolve_model(self.judge_model(cfg), cfg.run_dir),
            engine_cfg=cfg.engine, task=TaskSpec(JudgeTask, {"cfg": pcfg, "pset": pset}),
            engines=ctx.engines, desc="preferences: judging")
        ctx.metrics.update(preference_metrics(ctx.store, pair_store))
        ctx.metrics["pairs_phase"] = generation_metrics(pair_summaries)
        ctx.metrics["judging_phase"] = generation_metrics(judge_summaries)
        busy = ctx.metrics["judging_phase"]["engine_seconds"]
        if busy:
            ctx.metrics["judged_pairs_per_second"] = round(todo.num_rows / busy, 2)

    @staticmethod
    def _judged(store: StageStore) -> set[str]:
        """Pair ids already judged (the data rows are per principle) or rejected."""
        data = store.read("data", PreferenceRow.SCHEMA, columns=["id", "pair_id"])
        return set(data["pair_id"].to_pylist()) | store.done_ids({"rejects": RejectRow.SCHEMA})


def preference_metrics(store: StageStore, pair_store: StageStore) -> dict[str, Any]:
    rows = PreferenceRow.from_table(store.read("data", PreferenceRow.SCHEMA))
    out: dict[str, Any] = {
        "pairs": pair_store.read("data", ResponsePairRow.SCHEMA, columns=["id"]).num_rows,
        "pair_rejects": pair_store.read("rejects", RejectRow.SCHEMA, columns=["id"]).num_rows,
        "judgments": len(rows),
        "consistent_fraction": round(sum(r.consistent for r in rows) / len(rows), 4)
        if rows else 0.0,
    }
    types: dict[str, int] = {}
    for r in rows:
        types[r.prompt_type] = types.get(r.prompt_type, 0) + 1
    out["judgments_by_prompt_type"] = types
    return out
