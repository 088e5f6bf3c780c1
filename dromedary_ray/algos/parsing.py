"""Parsers and quality filters for model outputs. Pure text functions: no Ray, no torch.

Self-Align §3.2 keeps only answers that follow the exemplar pattern; we make each reason to drop
one explicit so that the rejects table says why every row left.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from dromedary_ray.prompts import THOUGHTS_CLOSE, THOUGHTS_OPEN

# Reasons a self_align row is rejected, in the order they are checked.
REJECT_NO_THOUGHTS = "no_thoughts"
REJECT_THOUGHTS_RUNAWAY = "thoughts_runaway"
REJECT_TRUNCATED = "truncated"
REJECT_NO_ANSWER = "no_answer"
REJECT_TOO_SHORT = "answer_too_short"
REJECT_LEAK = "exemplar_leak"
REJECT_REPETITION = "repetition"
REJECT_PROMPT_TOO_LONG = "prompt_too_long"
REJECT_ENGINE_ERROR = "engine_error"
SELF_ALIGN_REASONS = frozenset({
    REJECT_NO_THOUGHTS, REJECT_THOUGHTS_RUNAWAY, REJECT_TRUNCATED, REJECT_NO_ANSWER,
    REJECT_TOO_SHORT, REJECT_LEAK, REJECT_REPETITION, REJECT_PROMPT_TOO_LONG, REJECT_ENGINE_ERROR,
})

_WORD = re.compile(r"[a-z0-9']+")
# Turn markers that mean the model began writing the next turn of the transcript itself.
_TURN_MARKERS = (THOUGHTS_OPEN.strip(), "<|im_start|>", "### User", "### Assistant")


@dataclass(frozen=True)
class ParsedAnswer:
    thoughts: str | None
    answer: str
    reject_reason: str | None  # None: keep


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def repeated_ngram_fraction(text: str, n: int = 4) -> float:
    """Share of word n-grams that repeat an earlier one: 0 for varied text, near 1 for loops."""
    grams = ngrams(words(text), n)
    return 0.0 if not grams else 1.0 - len(set(grams)) / len(grams)


class LeakDetector:
    """Finds answers that copy a long word run from the in-context exemplars."""

    def __init__(self, exemplar_texts: Iterable[str], n: int):
        self.n = n
        self.grams = {g for t in exemplar_texts for g in ngrams(words(t), n)}

    def leaks(self, text: str) -> bool:
        return any(g in self.grams for g in ngrams(words(text), self.n))


def judge_answer(
    thoughts: str | None,
    answer: str,
    finish_reason: str,
    leak: LeakDetector,
    min_answer_words: int,
    max_repeated_fraction: float,
) -> ParsedAnswer:
    """Decide whether to keep one answer (and its thoughts, where the stage asks for them);
    the first failing check names the reason."""
    thoughts, answer = (thoughts.strip() if thoughts is not None else None), answer.strip()
    if thoughts == "":
        return ParsedAnswer(thoughts, answer, REJECT_NO_THOUGHTS)
    if finish_reason == "length":
        return ParsedAnswer(thoughts, answer, REJECT_TRUNCATED)
    if not answer:
        return ParsedAnswer(thoughts, answer, REJECT_NO_ANSWER)
    if len(words(answer)) < min_answer_words:
        return ParsedAnswer(thoughts, answer, REJECT_TOO_SHORT)
    if leak.leaks(answer) or any(m in answer for m in _TURN_MARKERS + (THOUGHTS_CLOSE,)):
        return ParsedAnswer(thoughts, answer, REJECT_LEAK)
    if repeated_ngram_fraction(answer) > max_repeated_fraction:
        return ParsedAnswer(thoughts, answer, REJECT_REPETITION)
    return ParsedAnswer(thoughts, answer, None)
