"""Self-assessment for I-SHEEP: strict grade parsing, the expected score from digit log-probs,
the keep filter and score histograms. Pure functions: no Ray, no torch.

I-SHEEP (Liang et al. 2024, §2.3) has the model grade its own (prompt, answer) pairs and keeps
only those it scores highly. A grade is read one of two ways:

* `parse_grade`: the model wrote its grade as text after the answer lead ("Score: "); the line
  must start with a whole number in range (optionally "/10" or "out of 10"); anything else is a
  reject with a reason, never a guessed number.
* `expected_score`: the grade's first digit is the next token after the lead, so one forward pass
  gives its distribution. Digits split one per token in the tokenizers we use (LLaMA, Qwen,
  SmolLM2), so a 10 is "1" then "0": the caller also asks for p("0" | lead + "1"), and the mass
  of "1" is shared between the grades 1 and 10 by that probability.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

REJECT_GRADE_MISSING = "grade_missing"  # nothing, or no number, where the grade should be
REJECT_GRADE_UNPARSEABLE = "grade_unparseable"  # text around the number makes it ambiguous
REJECT_GRADE_OUT_OF_RANGE = "grade_out_of_range"

_GRADE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(?:(?:/|out\s+of)\s*(\d+))?(.*)",
                    re.IGNORECASE | re.DOTALL)


@dataclass(frozen=True)
class Grade:
    score: float | None
    reject_reason: str | None  # None: a valid score


def parse_grade(text: str, min_score: int, max_score: int) -> Grade:
    """The grade a model wrote right after the answer lead, read strictly.

    Accepted: "9", "9.5" (small models often grade in halves though asked for whole numbers;
    the number is unambiguous, so it is kept as written), "9/10", "9 out of 10", "9." and a
    grade followed by a reason after a newline, a period, a comma, a colon or a dash
    ("9. Clear and correct."). Rejected: nothing
    or no leading number (missing); a second number, a range, or a word glued to the number
    ("9 or 10", "8-9", "9x") (unparseable); a number outside [min_score, max_score], or a
    denominator other than max_score (out of range / unparseable).
    """
    first_line = text.split("\n", 1)[0].strip()  # the grade's line is the first one, strictly
    match = _GRADE.fullmatch(first_line)
    if not first_line or not match:
        return Grade(None, REJECT_GRADE_MISSING)
    value, denominator, rest = float(match[1]), match[2], match[3]
    # A denominator over 4,300 digits is more than int() converts; no grade has 4 digits.
    if denominator is not None and (len(denominator) > 3 or int(denominator) != max_score):
        return Grade(None, REJECT_GRADE_UNPARSEABLE)
    rest = rest.strip()
    if rest and (rest[0] not in ".,:;)-" or any(ch.isdigit() for ch in rest)):
        return Grade(None, REJECT_GRADE_UNPARSEABLE)
    if not min_score <= value <= max_score:
        return Grade(None, REJECT_GRADE_OUT_OF_RANGE)
    return Grade(value, None)


def first_digits(min_score: int, max_score: int) -> list[str]:
    """The first-token digits of the valid grades (1..9 for a 1-10 scale)."""
    return sorted({str(s)[0] for s in range(min_score, max_score + 1)})


def needs_second_digit(max_score: int) -> bool:
    return max_score >= 10


def expected_score(first: Mapping[str, float], zero_after_one: float | None,
                   min_score: int, max_score: int) -> float:
    """E[grade] from log-probs of the grade's first digit (and of "0" after a "1" for 10).

    `first[d]`: log p(d | prompt + lead) for each d in `first_digits`; `zero_after_one`:
    log p("0" | prompt + lead + "1"), needed when max_score is 10. The distribution is
    renormalised over the valid grades, so mass the model puts on other tokens does not count.
    """
    terms: list[tuple[float, float]] = []  # (log-prob, grade)
    for d in first_digits(min_score, max_score):
        lp = first[d]
        if d == "1" and needs_second_digit(max_score):
            q = math.exp(zero_after_one) if zero_after_one is not None else 0.0
            if q > 0:
                terms.append((lp + math.log(q), 10.0))
            if q < 1 and min_score <= 1:
                terms.append((lp + math.log1p(-q), 1.0))
        else:
            terms.append((lp, float(d)))
    top = max(lp for lp, _ in terms)
    weights = [(math.exp(lp - top), grade) for lp, grade in terms]
    total = sum(w for w, _ in weights)
    return sum(w * grade for w, grade in weights) / total


def keep_pair(scores: Sequence[float], threshold: float) -> bool:
    """I-SHEEP's filter: keep a pair only where every rubric's score exceeds the threshold."""
    return all(s > threshold for s in scores)


def histogram(scores: Sequence[float], min_score: int, max_score: int) -> dict[str, int]:
    """Counts per whole grade (expected scores rounded to the nearest grade), every grade listed."""
    counts = {str(g): 0 for g in range(min_score, max_score + 1)}
    for s in scores:
        counts[str(min(max_score, max(min_score, int(math.floor(s + 0.5)))))] += 1
    return counts
