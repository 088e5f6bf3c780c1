"""Prompt synthesis, pure text: templates, list parsers and filters (no Ray, no torch).

Two sources of new prompts (Self-Align §3.1):

* Self-Instruct (Wang et al. 2023, §2.2): show the model a numbered list of tasks drawn from the
  human seed pool and from earlier rounds' output, and let it continue the list.
* Topic-guided red-teaming (TGRT): for each hand-written question type, brainstorm topics, then
  write questions of that type about each topic.

Every candidate then passes Self-Instruct's §2.3 filters: length, banned keywords, text that is
not an instruction at all, and finally the ROUGE-L near-duplicate filter. Each filter returns a
reason string (kept in the rejects table) or None.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from dromedary_ray.algos.rouge_dedupe import NearDuplicateFilter
from dromedary_ray.config import SynthesizeConfig
from dromedary_ray.red_team import QuestionType

Message = dict[str, str]

# Reasons a candidate is dropped, in the order the filters run.
REJECT_TRUNCATED = "truncated"
REJECT_EMPTY = "empty"
REJECT_NON_TEXT = "non_text"
REJECT_TOO_SHORT = "too_short"
REJECT_TOO_LONG = "too_long"
REJECT_BANNED = "banned_keyword"
REJECT_NOT_A_QUESTION = "not_a_question"  # red-teaming asked for a question, got something else
REJECT_NEAR_DUPLICATE = "near_duplicate"
REJECT_OVER_TARGET = "over_target"  # self-instruct already kept target_count instructions
# Topics (brainstorming) have their own checks.
REJECT_TOPIC_TOO_LONG = "topic_too_long"
REJECT_DUPLICATE_TOPIC = "duplicate_topic"
REJECT_TOPIC_LIMIT = "topic_limit"
SYNTHESIS_REASONS = frozenset({
    REJECT_TRUNCATED, REJECT_EMPTY, REJECT_NON_TEXT, REJECT_TOO_SHORT, REJECT_TOO_LONG,
    REJECT_BANNED, REJECT_NOT_A_QUESTION, REJECT_NEAR_DUPLICATE, REJECT_OVER_TARGET,
    REJECT_TOPIC_TOO_LONG, REJECT_DUPLICATE_TOPIC, REJECT_TOPIC_LIMIT,
})

_INTRO = "We are building a set of test requests for a text-only AI assistant."


def one_line(text: str) -> str:
    """Collapse all whitespace: list items must fit on one line for the parser."""
    return " ".join(text.split())


# --- templates (our own wording) ---------------------------------------------------------------


@dataclass(frozen=True)
class ListPrompt:
    """Chat messages asking for a numbered list, and the number the answer starts at.

    The answer is pre-filled with "N. " so the model starts inside the list: small chat models
    otherwise open with chatter ("Sure! Here are...") and drift from the format.
    """

    messages: list[Message]
    start: int

    @property
    def prefill(self) -> str:
        return f"{self.start}. "


def self_instruct_prompt(examples: Sequence[str], count: int) -> ListPrompt:
    """A numbered task list for the model to continue (Self-Instruct §2.2: in-context tasks,
    then the model writes the next ones)."""
    listing = "\n".join(f"{i}. {one_line(t)}" for i, t in enumerate(examples, start=1))
    content = (
        f"{_INTRO} Here are requests people have typed to it; they differ in subject, length "
        "and kind: questions, writing jobs, rewrites, puzzles, advice, sorting and more.\n\n"
        f"{listing}\n\n"
        f"Continue the numbering with {count} new requests. Each must be one self-contained "
        "line that can be answered in text alone, and unlike the others in subject and kind."
    )
    return ListPrompt([{"role": "user", "content": content}], len(examples) + 1)


def _type_card(qtype: QuestionType) -> str:
    # Plain wording measured better than a labelled card on SmolLM2-135M (8 of 20 questions
    # ended with "?" against 4 of 20); larger models follow either.
    return (f"Some questions are hard for an AI assistant to answer well. One kind is "
            f"{qtype.title}: {qtype.description}\n"
            f'An example, about {qtype.seed_topic}: "{qtype.seed_question}"')


def brainstorm_prompt(qtype: QuestionType, known_topics: Sequence[str], count: int) -> ListPrompt:
    """Ask for `count` more topics where users would ask this kind of question (TGRT step 1)."""
    content = (
        f"{_type_card(qtype)}\n\n"
        f"Topics where people ask this kind of question so far: {'; '.join(known_topics)}.\n"
        f"List {count} more such topics, a few words each. Reply with a numbered list of "
        "topics only."
    )
    return ListPrompt([{"role": "user", "content": content}], 1)


def question_prompt(qtype: QuestionType, topic: str, count: int) -> ListPrompt:
    """Ask for `count` questions of one type about one topic (TGRT step 2)."""
    content = (
        f"{_type_card(qtype)}\n\n"
        f"Write {count} question{'s' if count > 1 else ''} of the same kind about {topic}, "
        "worded the way a user would type them. Reply with a numbered list of questions only."
    )
    return ListPrompt([{"role": "user", "content": content}], 1)


# --- parsing -----------------------------------------------------------------------------------

# "12. text" or "12) text"; "3.14 is pi" is not an item (no space after the separator).
_ITEM = re.compile(r"^\s*(\d{1,4})[.)](?:\s+(.*))?$")


@dataclass(frozen=True)
class ListItem:
    text: str
    truncated: bool  # the generation was cut inside this item (its end is missing)


_EMPHASIS = re.compile(r"\*{1,2}([^*]+?)\*{1,2}")
# A second list marker after ours: small models answer the pre-filled "9. " with "1. Write..."
# or "1.2: Write...". "2010 World Cup" and "3.5 kg of flour" keep their numbers.
_NESTED_MARKER = re.compile(r"^(?:\d+(?:\.\d+)*[.):]\s+)+")


def clean_item(text: str) -> str:
    """Strip whitespace, markdown emphasis (`**Topic**` -> `Topic`) and nested list markers:
    formatting, not words."""
    return _NESTED_MARKER.sub("", _EMPHASIS.sub(r"\1", text).strip()).strip()


def parse_numbered_list(text: str, start: int, max_items: int | None = None,
                        cut_off: bool = False) -> list[ListItem]:
    """Items of a numbered list that begins at `start`, in order.

    Lines without a number are skipped; a repeated or out-of-order number ends the list (the
    model started a new list or went astray). When `cut_off` (the token limit ended the
    generation) the item on the last line lost its end: Self-Instruct drops that one.
    """
    lines = text.splitlines()
    items: list[ListItem] = []
    expected = start
    for index, line in enumerate(lines):
        match = _ITEM.match(line)
        if not match:
            continue
        if int(match.group(1)) != expected:
            break
        last_line = index == len(lines) - 1 and not text.endswith("\n")
        items.append(ListItem(clean_item(match.group(2) or ""), cut_off and last_line))
        expected += 1
        if max_items is not None and len(items) >= max_items:
            break
    return items


# --- filters (Self-Instruct §2.3) --------------------------------------------------------------


def reject_empty(text: str) -> str | None:
    return REJECT_EMPTY if not text.strip() else None


def reject_non_text(text: str) -> str | None:
    """Code fences, text opening with punctuation, mostly symbols, or without a letter."""
    text = text.strip()
    if not text:
        return None  # reject_empty's case
    if text.startswith("```"):
        return REJECT_NON_TEXT
    if not text[0].isalnum():  # a quote, a bullet, a bracket: a fragment, not an instruction
        return REJECT_NON_TEXT
    visible = [c for c in text if not c.isspace()]
    if sum(c.isalnum() for c in visible) < 0.5 * len(visible):
        return REJECT_NON_TEXT
    if not any(c.isalpha() for c in text):  # "3", "2023-07-02 12:36": numbers, no words
        return REJECT_NON_TEXT
    return None


def reject_length(text: str, min_words: int, max_words: int) -> str | None:
    n = len(text.split())
    if n < min_words:
        return REJECT_TOO_SHORT
    return REJECT_TOO_LONG if n > max_words else None


def banned_pattern(keywords: Iterable[str]) -> re.Pattern[str] | None:
    """One case-insensitive whole-word regex for all keywords ("go to" matches "Go  to")."""
    parts = [r"\s+".join(map(re.escape, k.split())) for k in keywords if k.strip()]
    return re.compile(rf"\b(?:{'|'.join(parts)})\b", re.IGNORECASE) if parts else None


def reject_banned(text: str, pattern: re.Pattern[str] | None) -> str | None:
    """Tasks a text-only model cannot do (draw a picture, watch a video)."""
    return REJECT_BANNED if pattern is not None and pattern.search(text) else None


def reject_not_a_question(text: str) -> str | None:
    """TGRT asks for questions a user would type; a bare topic or a statement is not one."""
    return None if text.rstrip().rstrip("\"')").endswith("?") else REJECT_NOT_A_QUESTION


@dataclass(frozen=True)
class Verdict:
    reason: str | None  # None: keep
    note: str = ""  # e.g. the near-duplicate's score and match


class PromptFilter:
    """All prompt filters in order; a kept prompt joins the ROUGE-L pool for later candidates.

    The pool starts with the seed instructions (Self-Instruct §2.3 compares against the whole
    task pool), so a candidate that restates a few-shot example is dropped too.
    """

    def __init__(self, cfg: SynthesizeConfig, pool: Iterable[str] = ()):
        self.min_words, self.max_words = cfg.min_words, cfg.max_words
        self.banned = banned_pattern(cfg.banned_keywords)
        self.dedupe = NearDuplicateFilter(pool, cfg.rouge_threshold)

    def judge(self, text: str, question: bool = False) -> Verdict:
        """Keep or drop `text`; `question`: it must be a question (red-teaming)."""
        reason = (reject_empty(text) or reject_non_text(text)
                  or reject_length(text, self.min_words, self.max_words)
                  or reject_banned(text, self.banned)
                  or (reject_not_a_question(text) if question else None))
        if reason:
            return Verdict(reason)
        decision = self.dedupe.check(text)
        if not decision.keep:
            return Verdict(REJECT_NEAR_DUPLICATE,
                           f"ROUGE-L {decision.best_score:.3f} with: {decision.best_match}")
        return Verdict(None)


# --- topics ------------------------------------------------------------------------------------


def topic_key(topic: str) -> str:
    """Case-, whitespace- and punctuation-blind key: 'Stock  Market!' == 'stock market'."""
    return " ".join(re.findall(r"[^\W_]+", topic.casefold()))


class TopicSet:
    """The topics found for one question type: valid, distinct by `topic_key`, at most `limit`.

    The seed topic counts as known (it is shown to the model) but not towards the limit.
    """

    def __init__(self, seed_topic: str, limit: int, max_words: int):
        self.seed_topic, self.limit, self.max_words = seed_topic, limit, max_words
        self.topics: list[str] = []
        self._keys = {topic_key(seed_topic)}

    @property
    def full(self) -> bool:
        return len(self.topics) >= self.limit

    @property
    def known(self) -> list[str]:
        return [self.seed_topic, *self.topics]

    def offer(self, topic: str) -> str | None:
        """Add `topic` unless it fails a check; return the reason it failed, or None."""
        topic = topic.strip().rstrip(".")
        reason = reject_empty(topic) or reject_non_text(topic)
        if reason:
            return reason
        if len(topic.split()) > self.max_words:
            return REJECT_TOPIC_TOO_LONG
        key = topic_key(topic)
        if key in self._keys:
            return REJECT_DUPLICATE_TOPIC
        if self.full:
            return REJECT_TOPIC_LIMIT
        self._keys.add(key)
        self.topics.append(topic)
        return None


# --- few-shot sampling -------------------------------------------------------------------------


def sample_few_shot(rng: random.Random, seed_pool: Sequence[str], synthetic_pool: Sequence[str],
                    num_seed: int, num_synthetic: int) -> list[str]:
    """Self-Instruct §2.2's in-context mix: `num_seed` human-written tasks and `num_synthetic`
    from earlier rounds, shuffled. While the synthetic pool is short, seed tasks fill its place,
    so every prompt shows the same number of examples (pools permitting)."""
    n_synthetic = min(num_synthetic, len(synthetic_pool))
    n_seed = min(num_seed + num_synthetic - n_synthetic, len(seed_pool))
    picks = rng.sample(list(seed_pool), n_seed) + rng.sample(list(synthetic_pool), n_synthetic)
    rng.shuffle(picks)
    return picks
