"""The synthesize stage's pure parts: templates, parsers, filters, topics, few-shot sampling,
the red-team types loader, and the round planner driven by a scripted fake engine (no Ray)."""

import dataclasses
import random
from collections import Counter
from pathlib import Path

import pytest

from dromedary_ray.algos.rouge_dedupe import rouge_l_f, tokenize
from dromedary_ray.algos.synthesis import (
    REJECT_BANNED,
    REJECT_DUPLICATE_TOPIC,
    REJECT_EMPTY,
    REJECT_NEAR_DUPLICATE,
    REJECT_NON_TEXT,
    REJECT_NOT_A_QUESTION,
    REJECT_TOO_LONG,
    REJECT_TOO_SHORT,
    REJECT_TOPIC_LIMIT,
    REJECT_TOPIC_TOO_LONG,
    SYNTHESIS_REASONS,
    PromptFilter,
    TopicSet,
    banned_pattern,
    brainstorm_prompt,
    parse_numbered_list,
    question_prompt,
    reject_banned,
    reject_empty,
    reject_length,
    reject_non_text,
    reject_not_a_question,
    sample_few_shot,
    self_instruct_prompt,
    topic_key,
)
from dromedary_ray.config import SynthesizeConfig, build
from dromedary_ray.data.schemas import PromptRow, RejectRow
from dromedary_ray.data.synth_schemas import CandidateRow, RequestRow
from dromedary_ray.engines.base import Completion, Generation, done_future
from dromedary_ray.errors import InputFileError
from dromedary_ray.prompts import render_chat
from dromedary_ray.red_team import QuestionType, load_red_team_types
from dromedary_ray.stages.synthesize import SynthesisPlan, SynthesisTask, seed_examples

QT = QuestionType("future_events", "Asks what will happen later.", "football", "Who wins the cup?")


def texts(items):
    return [i.text for i in items]


# --- parsing -----------------------------------------------------------------------------------


def test_parser_reads_dot_and_paren_items_and_skips_unnumbered_junk():
    text = ("9. Write a poem about rain.\nSure, more below!\n10) Name three rivers.\n\n"
            "11.  Sort these words.  ")
    assert texts(parse_numbered_list(text, 9)) == [
        "Write a poem about rain.", "Name three rivers.", "Sort these words."]


@pytest.mark.parametrize("text, expected", [
    ("1. a b c\n2. d e f\n2. again\n3. never", ["a b c", "d e f"]),  # repeated number
    ("1. a b c\n3. skipped two\n4. x", ["a b c"]),  # out of order (jumps ahead)
    ("1. a b c\n2. d e f\n1. new list", ["a b c", "d e f"]),  # restarts: stop
    ("5. wrong start\n6. x", []),
    ("", []),
    ("Here you go:\n- bullets\n- only", []),
])
def test_parser_stops_at_repeated_or_out_of_order_numbers(text, expected):
    assert texts(parse_numbered_list(text, 1)) == expected


def test_parser_keeps_empty_items_for_the_filters_and_ignores_decimals():
    assert texts(parse_numbered_list("1. \n2. b c d", 1)) == ["", "b c d"]
    assert texts(parse_numbered_list("1. pi is\n3.14 is pi\n2. next", 1)) == ["pi is", "next"]


def test_parser_strips_markdown_emphasis_and_nested_list_markers():
    assert texts(parse_numbered_list("1. **Stock market** \n2. *Weather* today", 1)) == [
        "Stock market", "Weather today"]
    # Small models answer a pre-filled "9. " with a list of their own.
    text = ("9. 1. Name a river.\n10. 1.2) Name a lake.\n11. 1.1.1: Name a sea.\n"
            "12. 2010 World Cup\n13. 3.5 kg of rice?")
    assert texts(parse_numbered_list(text, 9)) == [
        "Name a river.", "Name a lake.", "Name a sea.", "2010 World Cup", "3.5 kg of rice?"]


def test_parser_caps_items_and_flags_only_the_cut_last_item():
    assert texts(parse_numbered_list("1. a\n2. b\n3. c", 1, max_items=2)) == ["a", "b"]
    items = parse_numbered_list("1. whole\n2. cut mid-sent", 1, cut_off=True)
    assert [i.truncated for i in items] == [False, True]
    # Junk after the list was cut, not the list: every item is whole.
    items = parse_numbered_list("1. whole\n2. whole too\nblah blah", 1, cut_off=True)
    assert [i.truncated for i in items] == [False, False]
    assert not parse_numbered_list("1. whole\n2. cut", 1, cut_off=False)[-1].truncated
    # Capped before the end: the cut happened in an item we never read.
    assert not parse_numbered_list("1. a\n2. b", 1, max_items=1, cut_off=True)[0].truncated


# --- filters -----------------------------------------------------------------------------------


def test_empty_and_length_filters():
    assert reject_empty("  \n ") == REJECT_EMPTY and reject_empty("Hi there") is None
    assert reject_length("Name two", 3, 5) == REJECT_TOO_SHORT
    assert reject_length("Name two rivers", 3, 5) is None
    assert reject_length("one two three four five six", 3, 5) == REJECT_TOO_LONG


def test_banned_keywords_are_whole_word_and_case_insensitive():
    pattern = banned_pattern(("image", "go to", "map"))
    assert reject_banned("Describe this IMAGE briefly.", pattern) == REJECT_BANNED
    assert reject_banned("Should I Go  to the store?", pattern) == REJECT_BANNED
    assert reject_banned("Explain the mapping of keys to values.", pattern) is None
    assert reject_banned("What is imagery in poetry?", pattern) is None
    assert reject_banned("Going to the store", pattern) is None
    assert banned_pattern(()) is None and reject_banned("an image", None) is None


@pytest.mark.parametrize("text, reason", [
    ("```python\nprint(1)\n```", REJECT_NON_TEXT),
    ("```", REJECT_NON_TEXT),
    ("- a bullet, not a task", REJECT_NON_TEXT),
    ('"Quoted fragment" says who?', REJECT_NON_TEXT),
    ("a ## $$ %% ^^ && ** ((", REJECT_NON_TEXT),
    ("3", REJECT_NON_TEXT),
    ("2023-07-02 12:36:37", REJECT_NON_TEXT),
    ("2010 World Cup", None),
    ("What is 2+2?", None),
    ("Explain recursion to a child.", None),
])
def test_non_text_filter(text, reason):
    assert reject_non_text(text) == reason


def test_question_filter_wants_a_question_mark():
    assert reject_not_a_question("Who will win the 2030 World Cup?") is None
    assert reject_not_a_question('She asked "is it safe?"') is None
    assert reject_not_a_question("2010 World Cup") == REJECT_NOT_A_QUESTION
    assert reject_not_a_question("Tell me who wins.") == REJECT_NOT_A_QUESTION
    filt = PromptFilter(SynthesizeConfig())
    assert filt.judge("The cup is won by Spain.", question=True).reason == REJECT_NOT_A_QUESTION
    assert filt.judge("The cup is won by Spain.").reason is None


def test_prompt_filter_runs_filters_in_order_and_grows_its_rouge_pool():
    cfg = SynthesizeConfig(min_words=3, max_words=12)
    filt = PromptFilter(cfg, pool=["Write a haiku about the first snow of winter."])
    assert filt.judge("").reason == REJECT_EMPTY
    assert filt.judge("!!! wow").reason == REJECT_NON_TEXT
    assert filt.judge("Hi").reason == REJECT_TOO_SHORT
    assert filt.judge("Draw a picture of a cat.").reason == REJECT_BANNED
    dup = filt.judge("Write a haiku about the first snow in winter.")
    assert dup.reason == REJECT_NEAR_DUPLICATE and "first snow of winter" in dup.note
    assert filt.judge("List three causes of the French Revolution.").reason is None
    # The kept text joined the pool: its near-copy is now a duplicate.
    assert filt.judge("List three causes of the French revolution!").reason == REJECT_NEAR_DUPLICATE


# --- topics ------------------------------------------------------------------------------------


def test_topic_key_ignores_case_whitespace_and_punctuation():
    assert topic_key("Stock  Market!") == topic_key("stock market") == topic_key(" STOCK-market. ")
    assert topic_key("stock markets") != topic_key("stock market")


def test_topic_set_dedupes_caps_and_checks_topics():
    topics = TopicSet("Stock market", limit=2, max_words=4)
    assert topics.offer("stock MARKET.") == REJECT_DUPLICATE_TOPIC  # the seed topic is known
    assert topics.offer("Weather") is None
    assert topics.offer("  weather!! ") == REJECT_DUPLICATE_TOPIC
    assert topics.offer("one two three four five") == REJECT_TOPIC_TOO_LONG
    assert topics.offer("") == REJECT_EMPTY and topics.offer("--") == REJECT_NON_TEXT
    assert topics.offer("Sports scores.") is None
    assert topics.full and topics.offer("Exchange rates") == REJECT_TOPIC_LIMIT
    assert topics.topics == ["Weather", "Sports scores"]
    assert topics.known == ["Stock market", "Weather", "Sports scores"]


# --- few-shot sampling and templates -----------------------------------------------------------

SEEDS = [f"seed task {i}" for i in range(30)]
SYNTH = [f"synthetic task {i}" for i in range(10)]


def test_few_shot_sampling_is_seeded_and_draws_the_configured_counts():
    draw = sample_few_shot(random.Random(7), SEEDS, SYNTH, 6, 2)
    assert draw == sample_few_shot(random.Random(7), SEEDS, SYNTH, 6, 2)
    assert draw != sample_few_shot(random.Random(8), SEEDS, SYNTH, 6, 2)
    assert sum(t in SEEDS for t in draw) == 6 and sum(t in SYNTH for t in draw) == 2
    assert len(set(draw)) == 8
    # No synthetic pool yet (round 1): seed tasks take its place.
    assert sum(t in SEEDS for t in sample_few_shot(random.Random(1), SEEDS, [], 6, 2)) == 8
    one = sample_few_shot(random.Random(1), SEEDS, SYNTH[:1], 6, 2)
    assert Counter(t in SYNTH for t in one) == {False: 7, True: 1}
    assert len(sample_few_shot(random.Random(1), SEEDS[:3], [], 6, 2)) == 3  # pool too small


class PlainTokenizer:
    chat_template = None


def test_templates_number_the_list_and_prefill_the_next_number():
    prompt = self_instruct_prompt(["Task one.", "Task\ntwo."], count=5)
    content = prompt.messages[-1]["content"]
    assert "1. Task one.\n2. Task two." in content and "5 new requests" in content
    assert prompt.start == 3 and prompt.prefill == "3. "
    rendered = render_chat(PlainTokenizer(), prompt.messages, prompt.prefill)
    assert rendered.endswith("### Assistant\n3. ")
    brainstorm = brainstorm_prompt(QT, ["football", "elections"], 4)
    content = brainstorm.messages[-1]["content"]
    assert "so far: football; elections." in content and "List 4 more" in content
    assert "future events: Asks what will happen later." in content and brainstorm.prefill == "1. "
    assert '"Who wins the cup?"' in content
    question = question_prompt(QT, "the Olympics", 2)
    assert "Write 2 questions of the same kind about the Olympics" in (
        question.messages[-1]["content"])
    assert "Write 1 question of" in question_prompt(QT, "x", 1).messages[-1]["content"]


# --- red-team types ----------------------------------------------------------------------------


def test_shipped_red_team_types_load():
    types = load_red_team_types("principles/red_team_types.yaml")
    assert len(types) == 20 and len({t.name for t in types}) == 20
    assert all(t.description and t.seed_topic and t.seed_question.endswith("?") for t in types)


GOOD_TYPES = """name: t
types:
  - name: alpha
    description: d
    seed_topic: s
    seed_question: q
  - name: beta
    description: d
    seed_topic: s
    seed_question: q
"""


@pytest.mark.parametrize("text, match", [
    (GOOD_TYPES.replace("    seed_question: q\n", "", 1),
     r"t\.yaml \[types\[0\]\.seed_question\]: missing"),
    (GOOD_TYPES.replace("name: beta", "name: Beta Type"),
     r"\[types\[1\]\.name\]: must be lower-case"),
    (GOOD_TYPES.replace("name: beta", "name: alpha"), r"\[types\[1\]\.name\]: duplicate"),
    (GOOD_TYPES.replace("description: d", "description: ''", 1),
     r"\[types\[0\]\.description\]: must not be empty"),
    ("name: t\ntypes: {a: 1}\n", r"\[types\]: expected list"),
    ("name: t\ntypes: []\n", r"\[types\]: needs at least one"),
    ("types: []\n", r"\[name\]: missing required key"),
    ("name: t\ntypes: [unclosed\n", r"t\.yaml:\d+: invalid YAML"),
])
def test_malformed_red_team_types_name_file_and_key(tmp_path, text, match):
    path = tmp_path / "t.yaml"
    path.write_text(text)
    with pytest.raises(InputFileError, match=match):
        load_red_team_types(path)


def test_missing_types_file_is_an_input_error(tmp_path):
    with pytest.raises(InputFileError, match="nope.yaml: file not found"):
        load_red_team_types(tmp_path / "nope.yaml")


# --- the round planner with a scripted engine --------------------------------------------------

WORDS = [f"{a}{b}" for a in ("bla", "cro", "dwi", "fen", "gul", "hov", "jix", "kem")
         for b in ("ar", "ek", "ol", "um", "yt", "ap")]


class ImmediateEngine:
    """A scripted engine's `submit`: its `generate`, already finished."""

    def submit(self, prompts, sampling, seeds):
        return [done_future(g) for g in self.generate(prompts, sampling, seeds)]


class ScriptedEngine(ImmediateEngine):
    """Writes lists a real model might: fresh random tasks, plus duplicates and junk."""

    def __init__(self):
        self.calls = 0

    def generate(self, prompts, sampling, seeds):
        self.calls += 1
        return [self._one(p, s, sampling) for p, s in zip(prompts, seeds, strict=True)]

    def _one(self, prompt, seed, sampling):
        rng = random.Random(seed)
        if "Continue the numbering" in prompt:
            start = int(prompt.rsplit("\n", 1)[-1].split(".")[0])
            items = ["Describe the weather on Mars today.", "Draw a map of town.",
                     "Explain " + " ".join(rng.sample(WORDS, 5)) + "."]
            body = "\n".join(f"{start + i}. {t}" for i, t in enumerate(items))
        elif "more such topics" in prompt:
            w, v = rng.choice(WORDS), rng.choice(WORDS)
            body = f"1. Topic {w}\n2. topic {w.upper()}!\n3. Space race\n4. Area {v}"
        else:
            body = "1. Will " + " ".join(rng.sample(WORDS, 4)) + " happen?"
        text = body.split(" ", 1)[1]  # the prefill "N. " is already in the prompt
        if sampling.stop and any(s in text for s in sampling.stop):
            text = text[: min(text.index(s) for s in sampling.stop if s in text)]
        return Generation(10, [Completion(text, [0] * 5, [], "stop")])


def small_config(topics=2, **si):
    return build(SynthesizeConfig, {
        "min_words": 3,
        "self_instruct": {"target_count": 7, "requests_per_round": 4, "max_rounds": 5,
                          "instructions_per_request": 3, **si},
        "red_team": {"topics_per_type": topics, "topics_per_request": 4, "brainstorm_rounds": 2},
    }, "synthesize.")


def run_rounds(cfg, types, engine):
    """The stage's loop, minus Ray: plan, generate through the task, filter."""
    plan = SynthesisPlan(cfg, seed_examples(cfg.seed_file), types)
    task = SynthesisTask(PlainTokenizer(), types, cfg.self_instruct.sampling, cfg.red_team.sampling)
    rounds = []
    while not plan.finished():
        requests = plan.plan_round(plan.rounds + 1)
        result = task.process(engine, RequestRow.to_table(requests))
        candidates = CandidateRow.from_table(result.kept)
        rejects = RejectRow.from_table(result.rejects)
        plan.absorb(candidates, rejects)
        rounds.append((requests, candidates, rejects))
    return plan, rounds


TYPES = (QT, QuestionType("riddles", "A trick question.", "weights", "Which is heavier?"))


def test_plan_reaches_the_target_and_accounts_for_every_candidate():
    cfg = small_config()
    plan, rounds = run_rounds(cfg, TYPES, ScriptedEngine())
    kept = Counter(p.source for p in plan.prompts)
    assert kept["self_instruct"] == 7  # exactly the target; the surplus is rejected
    assert kept["tgrt"] == 2 * 2  # one question per (type, topic), topics capped per type
    assert plan.metrics()["topics_kept"] == 4
    # Round 1 filled every type's topics, so the questions come in round 2.
    phases = [sorted({r.phase for r in reqs}) for reqs, _, _ in rounds]
    assert phases[:2] == [["brainstorm", "self_instruct"], ["questions", "self_instruct"]]
    # Every candidate is kept or rejected (kept topics live in the plan); ids are unique.
    prompt_ids = [p.id for p in plan.prompts]
    reject_ids = [r.id for r in plan.rejects]
    assert len(set(prompt_ids + reject_ids)) == len(prompt_ids) + len(reject_ids)
    candidates = [c for _, cs, _ in rounds for c in cs]
    unaccounted = [c for c in candidates if c.id not in set(prompt_ids) | set(reject_ids)]
    assert len(unaccounted) == plan.metrics()["topics_kept"]
    assert all(c.kind == "topic" for c in unaccounted)
    reasons = Counter(r.reason for r in plan.rejects)
    assert {REJECT_NEAR_DUPLICATE, REJECT_BANNED, REJECT_DUPLICATE_TOPIC, REJECT_TOPIC_LIMIT,
            "over_target"} <= set(reasons)
    assert set(reasons) <= SYNTHESIS_REASONS
    queries = [p.query for p in plan.prompts]
    assert all(rouge_l_f(tokenize(a), tokenize(b)) <= cfg.rouge_threshold
               for i, a in enumerate(queries) for b in queries[i + 1:])


def test_later_rounds_draw_few_shot_examples_from_kept_instructions():
    cfg = small_config(target_count=50, max_rounds=3)
    plan, rounds = run_rounds(cfg, TYPES, ScriptedEngine())
    later = [r for reqs, _, _ in rounds[1:] for r in reqs if r.phase == "self_instruct"]
    assert len(later) == 2 * 4 and plan.si_rounds == 3 and plan.finished()
    for request in later:
        pool = {p.query for p in plan.prompts
                if p.source == "self_instruct" and int(p.id[4:7]) < request.round}
        assert len(pool) >= 2 and sum(e in pool for e in request.examples) == 2
        assert len(request.examples) == 8


def test_brainstorming_tops_up_short_types_before_questions():
    # 6 topics at 4 per request: two requests per type in round 1 (at most 5 new topics, as
    # each scripted list repeats one), then a top-up round, then the questions.
    cfg = small_config(topics=6, target_count=0)
    plan, rounds = run_rounds(cfg, TYPES, ScriptedEngine())
    assert [sorted({r.phase for r in reqs}) for reqs, _, _ in rounds] == [
        ["brainstorm"], ["brainstorm"], ["questions"]]
    assert [len(reqs) for reqs, _, _ in rounds[:2]] == [2 * 2, 2 * 1]
    # Round 2 shows the model the topics found in round 1 (after the seed topic).
    second = rounds[1][0][0]
    assert second.examples[0] == QT.seed_topic and "Space race" in second.examples
    kept_topics = plan.metrics()["topics_kept"]
    assert 2 * 5 < kept_topics <= 2 * 6
    assert Counter(p.source for p in plan.prompts) == {"tgrt": kept_topics}


def test_plan_is_deterministic_given_the_same_candidates():
    cfg = small_config()
    a, rounds_a = run_rounds(cfg, TYPES, ScriptedEngine())
    b, rounds_b = run_rounds(cfg, TYPES, ScriptedEngine())
    assert [r for r, _, _ in rounds_a] == [r for r, _, _ in rounds_b]
    assert a.prompts == b.prompts and a.rejects == b.rejects
    # Shuffled arrival (batches finish in any order) filters the same way.
    c = SynthesisPlan(cfg, seed_examples(cfg.seed_file), TYPES)
    for k, (_, cands, rejects) in enumerate(rounds_a, start=1):
        c.plan_round(k)
        c.absorb(random.Random(k).sample(cands, len(cands)), rejects[::-1])
    assert c.prompts == a.prompts and c.rejects == a.rejects


def test_task_turns_each_request_into_candidates_or_a_reject():
    class Engine(ImmediateEngine):
        def generate(self, prompts, sampling, seeds):
            return [Generation(5, [Completion("I cannot help with lists.", [1], [], "stop")]),
                    Generation(9000, [], "prompt_too_long: 9000 prompt tokens ...")]

    requests = [RequestRow(f"tgrt-{QT.name}-00{i}", "questions", 3, QT.name, "x", [], 1)
                for i in range(2)]
    task = SynthesisTask(PlainTokenizer(), (QT,), SynthesizeConfig().self_instruct.sampling,
                         SynthesizeConfig().red_team.sampling)
    result = task.process(Engine(), RequestRow.to_table(requests))
    # The pre-filled "1. " makes the first line an item, whatever the model wrote after it.
    (row,) = CandidateRow.from_table(result.kept)
    assert (row.id, row.text, row.kind) == (f"{requests[0].id}-1", "I cannot help with lists.",
                                            "question")
    assert [(r.id, r.reason) for r in RejectRow.from_table(result.rejects)] == [
        (requests[1].id, "prompt_too_long")]


def test_task_groups_requests_by_sampling_and_stops_after_the_wanted_items():
    seen = []

    class Engine(ImmediateEngine):
        def generate(self, prompts, sampling, seeds):
            seen.append((len(prompts), sampling.stop, sampling.max_new_tokens))
            return [Generation(1, [Completion("a b c\n2. d e f", [1], [], "stop")])] * len(prompts)

    cfg = small_config()
    plan = SynthesisPlan(cfg, SEEDS, TYPES)
    task = SynthesisTask(PlainTokenizer(), TYPES, cfg.self_instruct.sampling, cfg.red_team.sampling)
    result = task.process(Engine(), RequestRow.to_table(plan.plan_round(1)))
    assert sorted(seen) == sorted([(4, ("\n### User", "\n12."), 256),
                                   (2, ("\n### User", "\n5."), 128)])
    rows = CandidateRow.from_table(result.kept)
    assert {r.id for r in rows} >= {"si-r001-q0000-1", "bs-future_events-r001-q00-2"}
    assert {(r.source, r.kind) for r in rows} == {("self_instruct", "instruction"),
                                                  ("tgrt", "topic")}


def test_config_rejects_bad_synthesis_values():
    from dromedary_ray.errors import ConfigError

    with pytest.raises(ConfigError, match="synthesize.red_team.topics_per_request: must be >= 1"):
        build(SynthesizeConfig, {"red_team": {"topics_per_request": 0}}, "synthesize.")
    assert dataclasses.asdict(small_config())["self_instruct"]["target_count"] == 7
    assert Path("configs/local.yaml").read_text().count("synthesize:") == 1
    assert PromptRow.SCHEMA.names == ["id", "source", "query"]
