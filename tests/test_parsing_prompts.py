import pytest

from dromedary_ray.algos.parsing import (
    REJECT_LEAK,
    REJECT_NO_ANSWER,
    REJECT_NO_THOUGHTS,
    REJECT_REPETITION,
    REJECT_TOO_SHORT,
    REJECT_TRUNCATED,
    LeakDetector,
    judge_answer,
    repeated_ngram_fraction,
)
from dromedary_ray.principles import load_principles
from dromedary_ray.prompts import (
    PLAIN_STOP,
    THOUGHTS_OPEN,
    chat_stop_strings,
    self_align_messages,
    self_align_prompt,
)

EXEMPLAR = "The capital of France is Paris and it sits on the river Seine in the north of France"
LEAK = LeakDetector([EXEMPLAR], n=8)


def judge(thoughts, answer, finish="stop"):
    return judge_answer(thoughts, answer, finish, LEAK, min_answer_words=3,
                        max_repeated_fraction=0.5)


def test_keeps_a_well_formed_answer():
    p = judge(" The user asks about tea. Rule 2 (informative). ", "Green tea is unoxidised.\n")
    assert p.reject_reason is None
    assert p.thoughts == "The user asks about tea. Rule 2 (informative)."
    assert p.answer == "Green tea is unoxidised."


@pytest.mark.parametrize(
    "thoughts, answer, finish, reason",
    [
        ("  ", "A fine answer here.", "stop", REJECT_NO_THOUGHTS),
        ("t", "   ", "stop", REJECT_NO_ANSWER),
        ("t", "A long answer that got cut", "length", REJECT_TRUNCATED),
        ("t", "Yes.", "stop", REJECT_TOO_SHORT),
        ("t", f"Well, {EXEMPLAR.lower()}.", "stop", REJECT_LEAK),
        ("t", "Fine answer here.\n<thoughts>\nnext turn", "stop", REJECT_LEAK),
        ("t", "Fine answer here.\n</thoughts>\nmore", "stop", REJECT_LEAK),
        ("t", "Hi there you.<|im_start|>user", "stop", REJECT_LEAK),
        ("t", "I like cats a lot. " * 20, "stop", REJECT_REPETITION),
    ],
)
def test_rejects_with_reason(thoughts, answer, finish, reason):
    assert judge(thoughts, answer, finish).reject_reason == reason


def test_answers_without_thoughts_skip_the_thoughts_check():
    assert judge(None, "A complete answer with words.").reject_reason is None
    assert judge(None, "Cut off answer here", "length").reject_reason == REJECT_TRUNCATED


def test_repetition_measure():
    assert repeated_ngram_fraction("one two three four five six") == 0.0
    assert repeated_ngram_fraction("a b c d " * 10) > 0.8
    assert repeated_ngram_fraction("short") == 0.0


class ChatTok:
    chat_template = "x"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert not tokenize and add_generation_prompt
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


class PlainTok:
    chat_template = None


def test_self_align_prompt_has_rules_exemplars_and_query():
    ps = load_principles("principles/self_align.yaml")
    text = self_align_prompt(ChatTok(), ps, "How do magnets work?")
    for rule in ps.rules:
        assert f"{rule.id} ({rule.name}). {rule.text}" in text
    for ex in ps.exemplars:
        assert ex.query in text and ex.answer in text and ex.thoughts in text
    assert text.endswith("<user>How do magnets work?<assistant>" + THOUGHTS_OPEN)
    msgs = self_align_messages(ps, "q")
    assert [m["role"] for m in msgs] == ["system"] + ["user", "assistant"] * 5 + ["user"]


def test_num_exemplars_keeps_the_first_ones():
    from dromedary_ray.config import SelfAlignConfig
    from dromedary_ray.stages.self_align import stage_principles

    full = stage_principles(SelfAlignConfig())
    two = stage_principles(SelfAlignConfig(num_exemplars=2))
    assert two.exemplars == full.exemplars[:2] and two.rules == full.rules
    text = self_align_prompt(ChatTok(), two, "q")
    assert full.exemplars[1].answer in text and full.exemplars[2].answer not in text


def test_plain_format_for_models_without_chat_template():
    ps = load_principles("principles/self_align.yaml")
    text = self_align_prompt(PlainTok(), ps, "Why is the sky blue?")
    assert "### User\nWhy is the sky blue?\n\n### Assistant\n" + THOUGHTS_OPEN in text
    assert chat_stop_strings(PlainTok()) == (PLAIN_STOP,)
    assert chat_stop_strings(ChatTok()) == ()
