"""How much each stage generates and trains on, from the config where it says, else assumed.

Rows flow through a recipe: `seeds` or `synthesize` fill the prompts table; generation stages
answer every prompt and keep `plan.keep_fraction` of the answers (their filters); a fine-tune
trains on the previous generation stage's kept answers. Token counts are upper-ish estimates:
every answer runs to `max_new_tokens`, and a training example is the query plus that answer,
capped at `max_seq_len` (micro-batches pad to their longest example). Prompt lengths are the
constants below unless `plan.prompt_tokens.<stage>` says otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from dromedary_ray.plan.specs import PlanError
from dromedary_ray.plan.stages import section_name, stage_kind, stage_section

# Prompt sizes in tokens (LLaMA tokenizer). Self-Align's prompt is a preamble with 16 rules
# (~900 tokens) plus ~270 per exemplar: 1.5k with two exemplars, 2.3k with all five
# (cluster/README.md measured 2,103 SmolLM2 tokens for five; LLaMA's vocabulary is smaller).
SELF_ALIGN_PREAMBLE = 900
SELF_ALIGN_PER_EXEMPLAR = 270
SELF_INSTRUCT_PREAMBLE = 120  # instructions + numbered few-shot list
BRAINSTORM_PREAMBLE = 100
TOPIC_TOKENS = 6
QUESTION_PROMPT = 150
CHARS_PER_TOKEN = 4.0  # English text, for files we only have as characters
GENERIC_PROMPT = 512  # a stage with no model of its own prompt
GENERIC_NEW_TOKENS = 256
CHAT_TEMPLATE = 30  # a chat template's default system turn and role markers
RUBRIC_PROMPT = 300  # an I-SHEEP grading rubric and its instructions
# SALMON: a judging prompt (instructions, one principle, two replies' framing) and the reward
# model's template with its principles (3 drawn + 6 intervention definitions at RL time).
JUDGE_PROMPT = 250
RM_PRINCIPLES = 450


@dataclass(frozen=True)
class Flow:
    prompts: int = 0  # rows of the prompts table
    answers: int = 0  # rows the last generation stage kept: the next fine-tune's examples
    answer_tokens: int = 0  # generated tokens per kept answer


@dataclass(frozen=True)
class GenWork:
    requests: int
    prompt_tokens: float  # mean per request, shared prefix included
    shared_prefix: float  # tokens every request starts with (computed once if prefix-cached)
    new_tokens: float  # generated per request
    source: str


@dataclass(frozen=True)
class TrainWork:
    examples: int
    tokens_per_example: int
    epochs: int
    max_steps: int | None
    source: str


@dataclass(frozen=True)
class Work:
    gen: GenWork | None
    train: TrainWork | None
    flow: Flow
    score: GenWork | None = None  # PPO: the reward model's forward passes over the rollouts


def stage_work(stage: str, config: Any, flow: Flow) -> Work:
    """The work of one stage given what the stages before it left."""
    fn = WORKLOADS.get(stage)
    return fn(config, flow) if fn else _generic(stage, config, flow)


def _prompt(config: Any, stage: str, default: float) -> float:
    return float(config.plan.prompt_tokens.get(stage, default))


def _seeds(config: Any, flow: Flow) -> Work:
    from dromedary_ray.principles import load_seed_tasks

    if config.plan.prompts is not None:
        return Work(None, None, Flow(prompts=config.plan.prompts))
    n = len(load_seed_tasks(config.seeds.file))
    if config.seeds.max_prompts is not None:
        n = min(n, config.seeds.max_prompts)
    return Work(None, None, Flow(prompts=n))


def _synthesize(config: Any, flow: Flow) -> Work:
    from dromedary_ray.red_team import load_red_team_types

    cfg, keep, q = config.synthesize, config.plan.keep_fraction, config.plan.query_tokens
    si, rt = cfg.self_instruct, cfg.red_team
    per_round = si.requests_per_round * si.instructions_per_request * keep
    si_rounds = min(si.max_rounds, math.ceil(si.target_count / per_round)) if per_round else 0
    si_kept = min(si.target_count, int(si_rounds * per_round))
    n_types = len(load_red_team_types(rt.types_file)) if rt.topics_per_type else 0
    per_type = min(math.ceil(rt.topics_per_type / (rt.topics_per_request * keep)),
                   rt.brainstorm_rounds * math.ceil(rt.topics_per_type / rt.topics_per_request))
    parts = [  # (requests, prompt tokens, new tokens)
        (si_rounds * si.requests_per_round,
         SELF_INSTRUCT_PREAMBLE + q * (si.num_seed_examples + si.num_synthetic_examples),
         si.sampling.max_new_tokens),
        (n_types * per_type,
         BRAINSTORM_PREAMBLE + TOPIC_TOKENS * min(rt.max_listed_topics, rt.topics_per_type),
         rt.sampling.max_new_tokens),
        (n_types * rt.topics_per_type, QUESTION_PROMPT, rt.sampling.max_new_tokens),
    ]
    requests = sum(r for r, _, _ in parts)
    prompt, new = (sum(p[0] * p[i] for p in parts) / max(requests, 1) for i in (1, 2))
    questions = int(n_types * rt.topics_per_type * rt.questions_per_topic * keep)
    source = (f"{parts[0][0]:,} self-instruct requests ({si_rounds} rounds), {parts[1][0]:,} "
              f"topic brainstorms and {parts[2][0]:,} question requests over {n_types} types; "
              f"keeps {si_kept:,} instructions + {questions:,} red-team questions")
    gen = GenWork(requests, _prompt(config, "synthesize", prompt), 0.0, new, source)
    return Work(gen, None, Flow(prompts=si_kept + questions))


def _self_align(config: Any, flow: Flow) -> Work:
    from dromedary_ray.principles import load_principles

    cfg = config.self_align
    n_ex = cfg.num_exemplars or len(load_principles(cfg.principles_file).exemplars)
    prefix = SELF_ALIGN_PREAMBLE + SELF_ALIGN_PER_EXEMPLAR * n_ex
    prompt = _prompt(config, "self_align", prefix + config.plan.query_tokens)
    shared = min(prefix, prompt) if config.engine.enable_prefix_caching else 0.0
    new = cfg.max_thought_tokens + cfg.sampling.max_new_tokens  # thoughts, then the answer
    requests = _prompts_in(flow, "self_align")
    kept = int(requests * config.plan.keep_fraction)
    gen = GenWork(requests, prompt, shared, new,
                  f"{requests:,} prompts, {n_ex} exemplars; keeps {kept:,} answers")
    return Work(gen, None, Flow(flow.prompts, kept, cfg.sampling.max_new_tokens))


def _engrave(config: Any, flow: Flow) -> Work:
    return Work(None, _train_work(config, "engrave", flow.answers, flow.answer_tokens), flow)


def _sft(config: Any, flow: Flow) -> Work:
    return Work(None, _train_work(config, "sft", flow.answers, flow.answer_tokens), flow)


def _verbose_clone(config: Any, flow: Flow) -> Work:
    from dromedary_ray.principles import load_system_prompt

    cfg = config.verbose_clone
    system = len(load_system_prompt(cfg.system_prompt_file)) / CHARS_PER_TOKEN
    prompt = _prompt(config, "verbose_clone", system + config.plan.query_tokens)
    shared = min(system, prompt) if config.engine.enable_prefix_caching else 0.0
    requests = _prompts_in(flow, "verbose_clone")
    kept = int(requests * config.plan.keep_fraction)
    new = cfg.sampling.max_new_tokens
    gen = GenWork(requests, prompt, shared, new,
                  f"{requests:,} prompts under the verbose prompt; keeps {kept:,} answers")
    return Work(gen, _train_work(config, "verbose_clone", kept, new), Flow(flow.prompts, kept, new))


def _answer(config: Any, flow: Flow) -> Work:
    """I-SHEEP (b): the model answers each of its own prompts as a plain chat turn."""
    from dromedary_ray.principles import load_system_prompt

    cfg = stage_section(config, "answer")
    system = (len(load_system_prompt(cfg.system_prompt_file)) / CHARS_PER_TOKEN
              if cfg.system_prompt_file else CHAT_TEMPLATE)
    prompt = _prompt(config, "answer", system + config.plan.query_tokens)
    shared = min(system, prompt) if config.engine.enable_prefix_caching else 0.0
    requests = _prompts_in(flow, "answer")
    kept = int(requests * config.plan.keep_fraction)
    new = cfg.sampling.max_new_tokens
    gen = GenWork(requests, prompt, shared, new, f"{requests:,} prompts; keeps {kept:,} answers")
    return Work(gen, None, Flow(flow.prompts, kept, new))


def _assess(config: Any, flow: Flow) -> Work:
    """I-SHEEP (c): one grading request per (pair, rubric); `expected` reads one token."""
    cfg = stage_section(config, "assess")
    rubrics = len(cfg.rubrics)
    requests = flow.answers * rubrics
    if requests <= 0:
        raise PlanError("stage 'assess': no answers reach it (no answer stage before it)")
    prompt = _prompt(config, "assess",
                     RUBRIC_PROMPT + config.plan.query_tokens + flow.answer_tokens)
    new = 1 if cfg.method == "expected" else cfg.sampling.max_new_tokens
    kept = int(flow.answers * config.plan.keep_fraction)
    gen = GenWork(requests, prompt, 0.0, new,
                  f"{flow.answers:,} pairs x {rubrics} rubrics; keeps {kept:,} pairs")
    return Work(gen, None, Flow(flow.prompts, kept, flow.answer_tokens))


def _preferences(config: Any, flow: Flow) -> Work:
    """SALMON §3.1: two answers per prompt, then each pair judged under a few principles in
    both orders, each judgment one forward pass that reads the choice letter (one token)."""
    cfg = config.preferences
    prompts = _prompts_in(flow, "preferences")
    new = cfg.sampling.max_new_tokens
    pairs = int(prompts * config.plan.keep_fraction)
    judgments = pairs * cfg.principles_per_pair * 2
    answer_prompt = CHAT_TEMPLATE + config.plan.query_tokens
    judge_prompt = JUDGE_PROMPT + config.plan.query_tokens + 2 * new
    requests = 2 * prompts + judgments
    prompt = (2 * prompts * answer_prompt + judgments * judge_prompt) / requests
    mean_new = (2 * prompts * new + judgments) / requests
    gen = GenWork(requests, _prompt(config, "preferences", prompt), 0.0, mean_new,
                  f"{2 * prompts:,} answers ({prompts:,} prompts x 2), {judgments:,} one-token "
                  f"judgments ({pairs:,} pairs x {cfg.principles_per_pair} principles x 2 "
                  "orders)")
    return Work(gen, None, Flow(flow.prompts, pairs, new))


def _reward_model(config: Any, flow: Flow) -> Work:
    """SALMON §3.2: `draws_per_pair` principle-conditioned examples per judged pair, each a
    chosen and a rejected sequence (principles + prompt + response)."""
    cfg = config.reward_model
    if flow.answers <= 0:
        raise PlanError("stage 'reward_model': no judged pairs reach it (no preferences stage "
                        "before it)")
    per_side = RM_PRINCIPLES + config.plan.query_tokens + flow.answer_tokens
    tokens = 2 * min(cfg.train.max_seq_len, per_side)
    examples = flow.answers * cfg.draws_per_pair
    train = TrainWork(examples, tokens, cfg.train.epochs, cfg.train.max_steps,
                      f"{examples:,} examples ({flow.answers:,} pairs x {cfg.draws_per_pair} "
                      f"draws), chosen + rejected <= {tokens} tokens x {cfg.train.epochs} "
                      "epoch(s)")
    return Work(None, train, flow)


def _ppo(config: Any, flow: Flow) -> Work:
    """SALMON §3.3: per step, rollouts from the engines, one RM forward per rollout, then
    `ppo_epochs` passes of policy and value training over them (the stage's prompts are
    sampled per step, so its size is steps x prompts_per_step, not the prompt table)."""
    cfg = config.ppo
    _prompts_in(flow, "ppo")
    rollouts = cfg.steps * cfg.prompts_per_step * cfg.samples_per_prompt
    prompt = _prompt(config, "ppo", CHAT_TEMPLATE + config.plan.query_tokens)
    new = cfg.sampling.max_new_tokens
    gen = GenWork(rollouts, prompt, 0.0, new,
                  f"{rollouts:,} rollouts ({cfg.steps} steps x {cfg.prompts_per_step} prompts "
                  f"x {cfg.samples_per_prompt}) of <= {new} tokens")
    score = GenWork(rollouts, RM_PRINCIPLES + prompt + new, 0.0, 1.0,
                    f"{rollouts:,} reward-model forwards (principles + prompt + response)")
    train = _train_work(config, "ppo", rollouts, new, prompt_tokens=round(prompt))
    return Work(gen, train, flow, score)


def _generic(stage: str, config: Any, flow: Flow) -> Work:
    """A stage with no model of its own: answer every prompt, train on the kept answers."""
    kind = stage_kind(stage)
    section = stage_section(config, stage)
    gen = train = None
    out = flow
    if kind.generate:
        sampling = getattr(section, "sampling", None)
        new = sampling.max_new_tokens if sampling is not None else GENERIC_NEW_TOKENS
        requests = _prompts_in(flow, stage)
        prompt = _prompt(config, stage, GENERIC_PROMPT)
        kept = int(requests * config.plan.keep_fraction)
        gen = GenWork(requests, prompt, 0.0, new,
                      f"{requests:,} prompts, generic estimate (plan.prompt_tokens.{stage})")
        out = Flow(flow.prompts, kept, new)
    if kind.train and kind.concurrent and gen is not None:  # PPO trains on its own rollouts
        train = _train_work(config, stage, gen.requests, round(gen.new_tokens),
                            prompt_tokens=round(gen.prompt_tokens))
    elif kind.train:
        examples = out.answers if kind.generate else (flow.answers or flow.prompts)
        train = _train_work(config, stage, examples, out.answer_tokens or GENERIC_NEW_TOKENS)
    return Work(gen, train, out)


def _prompts_in(flow: Flow, stage: str) -> int:
    if flow.prompts <= 0:
        raise PlanError(f"stage {stage!r}: no prompts reach it (the stages before it make "
                        "none); set plan.prompts")
    return flow.prompts


def _train_work(config: Any, stage: str, examples: int, answer_tokens: int,
                prompt_tokens: int | None = None) -> TrainWork:
    train = train_section(config, stage)
    if examples <= 0:
        raise PlanError(f"stage {stage!r}: no examples reach it (no generation stage before it)")
    prompt = config.plan.query_tokens if prompt_tokens is None else prompt_tokens
    tokens = min(train.max_seq_len, prompt + answer_tokens)
    return TrainWork(examples, tokens, train.epochs, train.max_steps,
                     f"{examples:,} examples of <= {tokens} tokens x {train.epochs} epoch(s)")


def train_section(config: Any, stage: str) -> Any:
    """The stage's TrainConfig: its `train` block, or (ppo) the one its section derives."""
    section = stage_section(config, stage)
    train = getattr(section, "train", None)
    if train is None and hasattr(section, "train_config"):
        train = section.train_config(config.engine)
    if train is None:
        raise PlanError(f"stage {stage!r}: config has no {section_name(stage)}.train section "
                        "to plan from")
    return train


WORKLOADS = {
    "seeds": _seeds,
    "synthesize": _synthesize,
    "self_align": _self_align,
    "engrave": _engrave,
    "sft": _sft,
    "verbose_clone": _verbose_clone,
    "answer": _answer,
    "assess": _assess,
    "preferences": _preferences,
    "reward_model": _reward_model,
    "ppo": _ppo,
}
