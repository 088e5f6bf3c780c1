"""synthesize: Self-Align stage 1, Self-Instruct plus topic-guided red-teaming (Self-Align §3.1).

The stage works in rounds. Round k asks the engine pool, in one generation call, everything
that is ready to ask:

* self-instruct round k, while fewer than `target_count` instructions are kept and k is within
  `max_rounds` (its few-shot lists draw on instructions kept in rounds < k);
* TGRT brainstorm round k (k <= `brainstorm_rounds`), for question types short of topics;
* TGRT questions for every (type, topic), in the first round after brainstorming ends.

One call per round rather than per phase saves an engine start (~25 s on CPU) per phase and
gives the engines bigger batches. A round's raw candidates are committed to its own sub-store,
`synthesize/rounds/round-<k>`; the driver filters them one by one in a fixed order (round,
request id, position). So a resumed stage re-reads the finished rounds, filters them exactly as
before, and plans the same next round.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

import pyarrow as pa

from dromedary_ray.algos.parsing import REJECT_ENGINE_ERROR, REJECT_PROMPT_TOO_LONG
from dromedary_ray.algos.synthesis import (
    REJECT_OVER_TARGET,
    REJECT_TRUNCATED,
    ListPrompt,
    PromptFilter,
    TopicSet,
    Verdict,
    brainstorm_prompt,
    one_line,
    parse_numbered_list,
    question_prompt,
    sample_few_shot,
    self_instruct_prompt,
)
from dromedary_ray.config import (
    RunConfig,
    SamplingConfig,
    SynthesizeConfig,
    resolve_path,
)
from dromedary_ray.data.schemas import PromptRow, RejectRow
from dromedary_ray.data.store import StageStore, file_digest, fingerprint
from dromedary_ray.data.synth_schemas import (
    PHASE_BRAINSTORM,
    PHASE_QUESTIONS,
    PHASE_SELF_INSTRUCT,
    CandidateRow,
    RequestRow,
)
from dromedary_ray.engines.base import Engine, Generation
from dromedary_ray.principles import load_seed_tasks
from dromedary_ray.prompts import chat_stop_strings, render_chat
from dromedary_ray.red_team import QuestionType, load_red_team_types
from dromedary_ray.runtime.generate import BatchResult, TaskSpec
from dromedary_ray.stages.base import StageContext, generation_fingerprint
from dromedary_ray.stages.self_align import generation_metrics, row_seed

log = logging.getLogger(__name__)

STAGE = "synthesize"
# What each phase's list items are: (PromptRow source, candidate kind).
PHASE_OUTPUT = {
    PHASE_SELF_INSTRUCT: ("self_instruct", "instruction"),
    PHASE_BRAINSTORM: ("tgrt", "topic"),
    PHASE_QUESTIONS: ("tgrt", "question"),
}


# --- the engine side: one batch of requests -> raw candidates ----------------------------------


class SynthesisTask:
    """Renders requests through the model's chat format, samples, and parses the lists.

    Runs inside a generation worker; it filters nothing, so the round's sub-store holds every
    candidate the model wrote and the driver alone decides, in a fixed order, what is kept.
    """

    def __init__(self, tokenizer: Any, types: Sequence[QuestionType],
                 self_instruct_sampling: SamplingConfig, red_team_sampling: SamplingConfig):
        self.tokenizer = tokenizer
        self.types = {t.name: t for t in types}
        self.chat_stops = chat_stop_strings(tokenizer)
        self.base = {PHASE_SELF_INSTRUCT: self_instruct_sampling,
                     PHASE_BRAINSTORM: red_team_sampling, PHASE_QUESTIONS: red_team_sampling}

    def list_prompt(self, req: RequestRow) -> ListPrompt:
        if req.phase == PHASE_SELF_INSTRUCT:
            return self_instruct_prompt(req.examples, req.count)
        if req.phase == PHASE_BRAINSTORM:
            return brainstorm_prompt(self.types[req.type_name], req.examples, req.count)
        return question_prompt(self.types[req.type_name], req.topic, req.count)

    def sampling(self, req: RequestRow, prompt: ListPrompt) -> SamplingConfig:
        # Stop at the number after the last item wanted: the parser would drop the rest anyway.
        base = self.base[req.phase]
        extra = (*self.chat_stops, f"\n{prompt.start + req.count}.")
        return dataclasses.replace(base, stop=base.stop + tuple(s for s in extra
                                                                if s not in base.stop))

    def process(self, engine: Engine, batch: pa.Table) -> BatchResult:
        groups: dict[SamplingConfig, list[tuple[RequestRow, ListPrompt]]] = defaultdict(list)
        for req in RequestRow.from_table(batch):
            prompt = self.list_prompt(req)
            groups[self.sampling(req, prompt)].append((req, prompt))
        kept: list[CandidateRow] = []
        rejects: list[RejectRow] = []
        prompt_tokens = completion_tokens = 0
        # One submission per distinct sampling, all of them in flight at once.
        submitted = [(group, self._submit(engine, sampling, group))
                     for sampling, group in groups.items()]
        for group, futures in submitted:
            for (req, prompt), future in zip(group, futures, strict=True):
                gen = future.result()
                prompt_tokens += gen.prompt_tokens
                completion_tokens += sum(len(c.token_ids) for c in gen.completions)
                out = candidates_from(req, prompt, gen)
                if isinstance(out, RejectRow):
                    rejects.append(out)
                else:
                    kept.extend(out)
        return BatchResult(CandidateRow.to_table(kept), RejectRow.to_table(rejects),
                           prompt_tokens, completion_tokens)

    def _submit(self, engine: Engine, sampling: SamplingConfig,
                group: list[tuple[RequestRow, ListPrompt]]) -> list[Future[Generation]]:
        texts = [render_chat(self.tokenizer, p.messages, prefill=p.prefill) for _, p in group]
        return engine.submit(texts, sampling, [row_seed(sampling.seed, r.id) for r, _ in group])


def candidates_from(req: RequestRow, prompt: ListPrompt,
                    gen: Generation) -> list[CandidateRow] | RejectRow:
    """One candidate per parsed list item, or the engine's reason for refusing the request.

    The pre-filled "N. " makes the first line an item whatever follows, so a request with a
    completion always yields at least one candidate (an empty one goes to the filters)."""
    if gen.error:
        reason = (REJECT_PROMPT_TOO_LONG if gen.error.startswith("prompt_too_long")
                  else REJECT_ENGINE_ERROR)
        return RejectRow(req.id, STAGE, reason, gen.error)
    comp = gen.completions[0]
    items = parse_numbered_list(prompt.prefill + comp.text, prompt.start, req.count,
                                cut_off=comp.finish_reason == "length")
    source, kind = PHASE_OUTPUT[req.phase]
    return [CandidateRow(id=f"{req.id}-{i}", source=source, kind=kind, round=req.round,
                         request_id=req.id, position=i, type_name=req.type_name,
                         topic=req.topic, text=item.text, truncated=item.truncated)
            for i, item in enumerate(items, start=1)]


# --- the driver side: what to ask next, what to keep -------------------------------------------


class SynthesisPlan:
    """The driver's bookkeeping across rounds (no Ray): plans each round's requests and filters
    its candidates into kept prompts and rejects. Given the same candidates in the same order it
    makes the same decisions, which is what lets a resumed stage reuse finished rounds."""

    def __init__(self, cfg: SynthesizeConfig, seed_examples: Sequence[str],
                 types: Sequence[QuestionType]):
        self.si, self.rt = cfg.self_instruct, cfg.red_team
        self.seed_examples = list(seed_examples)
        # TGRT seed questions join the ROUGE pool too: a copy of the example is no new prompt.
        self.filter = PromptFilter(cfg, [*self.seed_examples, *(t.seed_question for t in types)])
        self.topics = {t.name: TopicSet(t.seed_topic, self.rt.topics_per_type,
                                        self.rt.max_topic_words) for t in types}
        self.synthetic: list[str] = []  # kept self-instruct instructions, the few-shot pool
        self.prompts: list[PromptRow] = []
        self.rejects: list[RejectRow] = []
        self.candidates: Counter[str] = Counter()
        self.rounds = self.si_rounds = 0
        self.questions_asked = self.rt.topics_per_type == 0 or not types

    def finished(self) -> bool:
        return not self._si_due() and self.questions_asked

    def _si_due(self) -> bool:
        return len(self.synthetic) < self.si.target_count and self.si_rounds < self.si.max_rounds

    def _brainstorm_due(self, k: int) -> bool:
        return k <= self.rt.brainstorm_rounds and not all(t.full for t in self.topics.values())

    def plan_round(self, k: int) -> list[RequestRow]:
        """The requests of round k; records which phases the round covers."""
        self.rounds = k
        rows: list[RequestRow] = []
        if self._si_due():
            self.si_rounds += 1
            rows += self._self_instruct_requests(k)
        if not self.questions_asked:
            if self._brainstorm_due(k):
                rows += self._brainstorm_requests(k)
            else:
                self.questions_asked = True
                rows += self._question_requests(k)
        return rows

    def _self_instruct_requests(self, k: int) -> list[RequestRow]:
        rows = []
        for j in range(self.si.requests_per_round):
            rid = f"si-r{k:03d}-q{j:04d}"
            rng = random.Random(row_seed(self.si.sampling.seed, rid))
            examples = sample_few_shot(rng, self.seed_examples, self.synthetic,
                                       self.si.num_seed_examples, self.si.num_synthetic_examples)
            rows.append(RequestRow(rid, PHASE_SELF_INSTRUCT, k, "", "", examples,
                                   self.si.instructions_per_request))
        return rows

    def _brainstorm_requests(self, k: int) -> list[RequestRow]:
        rows = []
        for name, topics in self.topics.items():
            missing = self.rt.topics_per_type - len(topics.topics)
            for j in range(math.ceil(max(missing, 0) / self.rt.topics_per_request)):
                rid = f"bs-{name}-r{k:03d}-q{j:02d}"
                known = topics.known
                if len(known) > self.rt.max_listed_topics:
                    rng = random.Random(row_seed(self.rt.sampling.seed, rid))
                    known = rng.sample(known, self.rt.max_listed_topics)
                rows.append(RequestRow(rid, PHASE_BRAINSTORM, k, name, "", known,
                                       self.rt.topics_per_request))
        return rows

    def _question_requests(self, k: int) -> list[RequestRow]:
        return [RequestRow(f"tgrt-{name}-{i:03d}", PHASE_QUESTIONS, k, name, topic, [],
                           self.rt.questions_per_topic)
                for name, topics in self.topics.items() for i, topic in enumerate(topics.topics)]

    def absorb(self, candidates: Sequence[CandidateRow],
               request_rejects: Sequence[RejectRow]) -> None:
        """Filter one round's candidates, in (round, request id, position) order."""
        self.rejects.extend(sorted(request_rejects, key=lambda r: r.id))
        for c in sorted(candidates, key=lambda c: (c.round, c.request_id, c.position)):
            self.candidates[c.kind] += 1
            verdict = self._judge(c)
            if verdict.reason:
                detail = f"{c.text}\n[{verdict.note}]" if verdict.note else c.text
                self.rejects.append(RejectRow(c.id, STAGE, verdict.reason, detail))

    def _judge(self, c: CandidateRow) -> Verdict:
        if c.kind == "instruction" and len(self.synthetic) >= self.si.target_count:
            return Verdict(REJECT_OVER_TARGET)
        if c.truncated:  # Self-Instruct drops the item the token limit cut short
            return Verdict(REJECT_TRUNCATED)
        if c.kind == "topic":
            return Verdict(self.topics[c.type_name].offer(c.text))
        verdict = self.filter.judge(c.text,
                                    question=c.kind == "question" and self.rt.require_question)
        if verdict.reason is None:
            self.prompts.append(PromptRow(id=c.id, source=c.source, query=c.text))
            if c.kind == "instruction":
                self.synthetic.append(c.text)
        return verdict

    def metrics(self) -> dict[str, Any]:
        kept = Counter(p.source for p in self.prompts)
        return {
            "rounds": self.rounds,
            "self_instruct_rounds": self.si_rounds,
            "candidates": dict(self.candidates),
            "kept": {"self_instruct": kept["self_instruct"], "tgrt": kept["tgrt"]},
            "topics_kept": sum(len(t.topics) for t in self.topics.values()),
            "rejects": dict(Counter(r.reason for r in self.rejects)),
        }


# --- rounds on the cluster ---------------------------------------------------------------------


class RoundGenerator:
    """Runs one round's requests through the generation runner into the round's sub-store, or
    re-reads the round when its sub-store says it finished with exactly these requests."""

    def __init__(self, ctx: StageContext, task: TaskSpec):
        self.ctx, self.task = ctx, task
        self.reused_rounds = self.generated_requests = 0
        self.summaries: list[Any] = []

    def store(self, k: int) -> StageStore:
        return StageStore(self.ctx.config.run_dir, f"{self.ctx.store.stage}/rounds/round-{k:03d}")

    def __call__(self, k: int, requests: list[RequestRow]) -> tuple[list[CandidateRow],
                                                                     list[RejectRow]]:
        store = self.store(k)
        digest = fingerprint([dataclasses.asdict(r) for r in requests])
        manifest = store.read_manifest() or {}
        if manifest.get("requests") != digest:
            store.clear()  # never started, or planned from other candidates: start afresh
        if manifest.get("requests") == digest and manifest.get("status") == "done":
            self.reused_rounds += 1
        else:
            self._generate(k, store, requests, digest)
        return (CandidateRow.from_table(store.read("data", CandidateRow.SCHEMA)),
                RejectRow.from_table(store.read("rejects", RejectRow.SCHEMA)))

    def _generate(self, k: int, store: StageStore, requests: list[RequestRow],
                  digest: str) -> None:
        from dromedary_ray.models import resolve_model
        from dromedary_ray.runtime.generate import run_generation

        cfg = self.ctx.config
        base = {"round": k, "requests": digest, "request_count": len(requests)}
        store.write_manifest({**base, "status": "running"})
        store.drop_uncommitted()
        done = set(store.read("data", CandidateRow.SCHEMA, ["id", "request_id"])["request_id"]
                   .to_pylist()) | set(store.read("rejects", RejectRow.SCHEMA, ["id"])["id"]
                                       .to_pylist())
        todo = [r for r in requests if r.id not in done]
        if todo:
            self.summaries += run_generation(
                RequestRow.to_table(todo), store=store,
                model_path=resolve_model(cfg.model, cfg.run_dir), engine_cfg=cfg.engine,
                task=self.task, engines=self.ctx.engines,
                desc=f"synthesize round {k}",
            )
        self.generated_requests += len(todo)
        store.write_manifest({**base, "status": "done"})

    def metrics(self) -> dict[str, Any]:
        return {"reused_rounds": self.reused_rounds, "generated_requests": self.generated_requests,
                **generation_metrics(self.summaries)}


def seed_examples(path: str) -> list[str]:
    """Seed tasks as one-line requests (instruction, then its input when it has one)."""
    return [one_line(t.query) for t in load_seed_tasks(path)]


class SynthesizeStage:
    name = STAGE
    data_schema = PromptRow.SCHEMA
    uses_ray = True
    trains = False

    def input_stages(self, config: RunConfig) -> tuple[str, ...]:
        return ()

    def fingerprint_payload(self, config: RunConfig) -> dict[str, Any]:
        cfg = config.synthesize
        return {
            "synthesize": config.section("synthesize"),
            "seed_file": file_digest(resolve_path(cfg.seed_file)),
            "types_file": file_digest(resolve_path(cfg.red_team.types_file)),
            **generation_fingerprint(config),
        }

    def check(self, config: RunConfig) -> None:
        load_seed_tasks(config.synthesize.seed_file)
        load_red_team_types(config.synthesize.red_team.types_file)

    def run(self, ctx: StageContext) -> None:
        cfg = ctx.config.synthesize
        types = load_red_team_types(cfg.red_team.types_file)
        plan = SynthesisPlan(cfg, seed_examples(cfg.seed_file), types)
        generate = RoundGenerator(ctx, TaskSpec(SynthesisTask, {
            "types": types, "self_instruct_sampling": cfg.self_instruct.sampling,
            "red_team_sampling": cfg.red_team.sampling,
        }))
        k = 0
        while not plan.finished():
            k += 1
            requests = plan.plan_round(k)
            candidates, rejects = generate(k, requests)
            plan.absorb(candidates, rejects)
            kept = plan.metrics()["kept"]
            log.info("synthesize round %d: %d requests, %d candidates; kept so far %s",
                     k, len(requests), len(candidates), kept)
        ctx.store.write_table(PromptRow.to_table(plan.prompts), RejectRow.to_table(plan.rejects))
        ctx.metrics.update({**plan.metrics(), **generate.metrics()})
