"""The fast Self-Instruct filter must agree exactly with rouge-score."""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import pytest
from rouge_score import rouge_scorer

from dromedary_ray.algos.rouge_dedupe import (
    DedupeDecision,
    NearDuplicateFilter,
    _count_hits,
    filter_near_duplicates,
    lcs_length,
    rouge_l_f,
    tokenize,
)

SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
VOCAB = "write a poem about the sea list three facts cats explain why".split()

CRAFTED_TEXTS = [
    "",
    " ",
    "!!!",
    "...,;:--()[]{}",
    "\t\n\r\x0b\x0c\u00a0\u2003",
    "Hello, World!",
    "don't stop-believing",
    "e-mail me at foo@bar.com, ok?",
    "3.14159 is pi; 2nd place; 100%",
    "CamelCaseWords and UPPER lower",
    "naïve café résumé über straße",
    "İstanbul ΣΊΣΥΦΟΣ ǅemal",
    "\u212a\u212b kelvin angstrom",
    "日本語のテキスト mixed with english",
    "emoji 😀 between 🚀 words",
    "tab\tseparated\nnew line",
    "a_b under_score",
    "ﬁ ligature ｆｕｌｌｗｉｄｔｈ",
]


def _random_text(rng: random.Random) -> str:
    alphabet = "abcXYZ019 ,.!?'-_\t\n" + "éßİ\u212aΣ😀日"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))


def _instruction(rng: random.Random, history: list[str]) -> str:
    """Short texts over a tiny vocabulary, often edits of earlier ones."""
    if history and rng.random() < 0.5:
        words = rng.choice(history).split()
        for _ in range(rng.randint(0, 2)):
            if words and rng.random() < 0.5:
                del words[rng.randrange(len(words))]
            else:
                words.insert(rng.randint(0, len(words)), rng.choice(VOCAB))
    else:
        words = rng.choices(VOCAB, k=rng.randint(0, 12))
    text = " ".join(words)
    if rng.random() < 0.3:
        text = text.upper() + rng.choice(["?", "!", " ...", ""])
    return text


def _instructions(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    texts: list[str] = []
    for _ in range(count):
        texts.append(_instruction(rng, texts))
    return texts


def reference_keep(
    candidates: Sequence[str], existing: Sequence[str] = (), threshold: float = 0.7
) -> list[bool]:
    """The straightforward Self-Instruct loop on rouge-score."""
    pool, keep = list(existing), []
    for text in candidates:
        scores = (SCORER.score(text, kept)["rougeL"].fmeasure for kept in pool)
        kept = not any(score > threshold for score in scores)
        keep.append(kept)
        if kept:
            pool.append(text)
    return keep


def _keeps(decisions: list[DedupeDecision]) -> list[bool]:
    return [decision.keep for decision in decisions]


@pytest.mark.parametrize("text", CRAFTED_TEXTS)
def test_tokenize_matches_rouge_score_on_crafted(text: str) -> None:
    assert tokenize(text) == SCORER._tokenizer.tokenize(text)


def test_tokenize_matches_rouge_score_on_random() -> None:
    rng = random.Random(0)
    for _ in range(2000):
        text = _random_text(rng)
        assert tokenize(text) == SCORER._tokenizer.tokenize(text), repr(text)


def test_rouge_l_f_matches_rouge_score() -> None:
    rng = random.Random(1)
    for _ in range(3000):
        a = rng.choices(VOCAB[:5], k=rng.randint(0, 14))
        b = rng.choices(VOCAB[:5], k=rng.randint(0, 14))
        expected = rouge_scorer._score_lcs(a, b).fmeasure
        assert rouge_l_f(a, b) == expected, (a, b)
        assert lcs_length(a, b) == rouge_scorer._lcs_table(a, b)[-1][-1]


def test_rouge_l_f_matches_on_texts_and_long_inputs() -> None:
    rng = random.Random(2)
    texts = CRAFTED_TEXTS + [_random_text(rng) for _ in range(200)]
    for a, b in zip(texts, reversed(texts), strict=True):
        expected = SCORER.score(a, b)["rougeL"].fmeasure
        assert rouge_l_f(tokenize(a), tokenize(b)) == expected
    for _ in range(30):  # beyond one machine word in the bit-parallel LCS
        a = rng.choices(VOCAB, k=rng.randint(60, 150))
        b = rng.choices(VOCAB, k=rng.randint(60, 150))
        assert rouge_l_f(a, b) == rouge_scorer._score_lcs(a, b).fmeasure


@pytest.mark.parametrize("seed", range(5))
def test_decisions_match_reference_without_existing(seed: int) -> None:
    candidates = _instructions(seed, 400)
    keep = _keeps(filter_near_duplicates(candidates))
    assert keep == reference_keep(candidates)
    assert 0 < sum(keep) < len(keep)  # near-duplicates really occur


@pytest.mark.parametrize("seed", range(3))
def test_decisions_match_reference_with_existing(seed: int) -> None:
    texts = _instructions(100 + seed, 400)
    existing, candidates = texts[:80], texts[80:]
    keep = _keeps(filter_near_duplicates(candidates, existing))
    assert keep == reference_keep(candidates, existing)


@pytest.mark.parametrize("threshold", [-0.1, 0.0, 0.3, 0.5, 0.6, 0.85, 1.0])
def test_decisions_match_reference_at_other_thresholds(threshold: float) -> None:
    texts = _instructions(7, 220)
    existing, candidates = texts[:20], texts[20:]
    keep = _keeps(filter_near_duplicates(candidates, existing, threshold))
    assert keep == reference_keep(candidates, existing, threshold)


def test_float_rounding_above_point_seven_is_dropped() -> None:
    short, long = "a b c d e f g", "a b c d e f g h i j k l m"  # true F = 14/20
    assert SCORER.score(long, short)["rougeL"].fmeasure == 0.7000000000000001
    assert rouge_l_f(tokenize(long), tokenize(short)) == 0.7000000000000001
    decisions = filter_near_duplicates([long], existing=[short])
    assert decisions == [DedupeDecision(False, 0.7000000000000001, short)]
    assert reference_keep([long], [short]) == [False]


def test_exact_point_seven_is_kept() -> None:
    kept, candidate = "a b c d e f g h i j", "a b c d e f g x y z"  # LCS 7 of 10 and 10
    assert SCORER.score(candidate, kept)["rougeL"].fmeasure == 0.7
    decision = filter_near_duplicates([candidate], existing=[kept])[0]
    assert decision.keep and decision.best_score <= 0.7  # pair may be pruned unscored
    assert reference_keep([candidate], [kept]) == [True]


def test_threshold_comparison_is_strictly_greater() -> None:
    first, second = "write a poem about the sea", "write a short poem about the sea today"
    score = SCORER.score(second, first)["rougeL"].fmeasure
    below = score - 1e-12
    assert filter_near_duplicates([second], [first], threshold=score)[0].keep
    assert not filter_near_duplicates([second], [first], threshold=below)[0].keep
    assert reference_keep([second], [first], score) == [True]
    assert reference_keep([second], [first], below) == [False]


def test_filter_pool_and_decision_details() -> None:
    dedupe = NearDuplicateFilter(["Write a poem about the sea."])
    dedupe.add("Write a poem about the sea!")  # added unchecked
    assert len(dedupe) == 2
    dropped = dedupe.check("write a poem about the sea")
    assert not dropped.keep and dropped.best_score == 1.0
    assert dropped.best_match in dedupe.pool
    kept = dedupe.check("List three facts about cats.")
    assert kept.keep and kept.best_score <= 0.7
    assert dedupe.pool[-1] == "List three facts about cats."
    for empty in ("", "?!", "日本語"):
        assert dedupe.check(empty) == DedupeDecision(True, 0.0, None)
    assert len(dedupe) == 6


def test_best_score_of_drop_is_a_real_score() -> None:
    candidates = _instructions(11, 200)
    pool: list[str] = []
    for text, decision in zip(candidates, filter_near_duplicates(candidates), strict=True):
        if decision.keep:
            assert decision.best_score <= 0.7
            pool.append(text)
        else:
            assert decision.best_match in pool
            expected = SCORER.score(text, decision.best_match)["rougeL"].fmeasure
            assert decision.best_score == expected > 0.7


def test_decisions_match_reference_with_wide_vocabulary() -> None:
    """Sparser hits than the tiny-vocabulary corpora."""
    rng = random.Random(5)
    vocab = [f"w{i}" for i in range(150)] + VOCAB
    texts: list[str] = []
    for _ in range(600):
        if texts and rng.random() < 0.3:
            words = rng.choice(texts).split()
            words[rng.randrange(len(words))] = rng.choice(vocab)
        else:
            words = rng.choices(vocab, k=rng.randint(3, 16))
        texts.append(" ".join(words))
    keep = _keeps(filter_near_duplicates(texts[100:], texts[:100]))
    assert keep == reference_keep(texts[100:], texts[:100])
    assert not all(keep)


@pytest.mark.parametrize("min_count", [1, 2, 3])
def test_count_hits_branches_agree(min_count: int) -> None:
    """Both the bincount (small pool) and the sort (huge pool) paths count alike."""
    hits = np.random.default_rng(min_count).integers(0, 50, 200).astype(np.int32)
    small = _count_hits(hits, 50, min_count)
    large = _count_hits(hits, 10**9, min_count)
    expected = {i: c for i, c in enumerate(np.bincount(hits)) if c >= min_count}
    for ids, counts in (small, large):
        assert dict(zip(ids.tolist(), counts.tolist(), strict=True)) == expected
