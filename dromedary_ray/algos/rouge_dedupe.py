"""Exact, fast ROUGE-L near-duplicate filtering for synthesised instructions.

Self-Instruct (Wang et al., 2023, §2.3 "Filtering and postprocessing") adds a
newly generated instruction to the task pool only when its ROUGE-L similarity
with every instruction already in the pool is below 0.7; Alpaca's
``generate_instruction.py`` and Dromedary's prompt synthesis reuse the rule
verbatim: a candidate is dropped when ``max(fmeasure) > 0.7`` (strictly greater,
so exactly 0.7 is kept), where the pool holds the seed instructions plus every
earlier *kept* candidate, candidates being processed in order.

The reference implementation scores every (candidate, pool entry) pair with
``rouge_score.rouge_scorer._score_lcs`` -- a quadratic-time Python DP per pair and
a quadratic number of pairs overall.  This module reproduces its decisions
*exactly*, including the floating point rounding that decides ties (a true
7/10 often evaluates to ``0.7000000000000001`` and is therefore dropped), but
skips almost all pairs:

* For lengths ``m`` (candidate) and ``n`` (pool entry) the smallest LCS length
  whose float F-measure, computed with rouge-score's own arithmetic, exceeds the
  threshold is precomputed (``_min_lcs_over``).  Every bound below is an upper
  bound on the LCS, so comparing it against that integer prunes exactly, and
  length pairs that can never pass are skipped outright.
* LCS <= multiset token overlap.  An inverted index maps each (token,
  occurrence) key to the pool entries holding it, so set overlap of keys equals
  multiset overlap of tokens.
* Prefix-style probing (as in set-similarity joins): a pool entry hit by ``c``
  of the probed keys shares at most ``c + unprobed`` keys with the candidate.
  Probing the rarest keys first (all but ``need - 1`` of them at least) keeps
  the scanned posting lists short, and the hit counting is vectorised with
  numpy, so very common words ("the", "a", "write") cost almost nothing.
* Survivors get an exact overlap check, then a bit-parallel LCS (Hyyrö 2004)
  over Python ints, and finally the exact float F-measure; the search stops at
  the first pool entry above the threshold.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from operator import attrgetter

import numpy as np

__all__ = [
    "DedupeDecision",
    "NearDuplicateFilter",
    "filter_near_duplicates",
    "lcs_length",
    "rouge_l_f",
    "tokenize",
]

_TOKEN_RE = re.compile(r"[a-z0-9]+")

DEFAULT_THRESHOLD = 0.7
"""Self-Instruct's ROUGE-L cut-off (Wang et al., 2023, §2.3)."""


def tokenize(text: str) -> list[str]:
    """Tokenise exactly like rouge-score's ``DefaultTokenizer(use_stemmer=False)``.

    rouge-score lowercases with ``str.lower`` (so e.g. the Kelvin sign becomes
    ``k``), replaces every run of characters outside ``[a-z0-9]`` by a space,
    splits on whitespace and drops empty tokens; the maximal ``[a-z0-9]`` runs of
    the lowercased text are exactly those tokens.
    """
    return _TOKEN_RE.findall(text.lower())


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token sequences.

    Bit-parallel (Hyyrö 2004): one bit per position of ``a``, one big-int
    update per token of ``b``, so it costs O(len(b)) word operations for
    instruction-sized inputs instead of the O(len(a) * len(b)) DP.
    """
    if not a or not b:
        return 0
    return _lcs_with_masks(_match_masks(a), (1 << len(a)) - 1, b)


def _match_masks(tokens: Sequence[str]) -> dict[str, int]:
    """Map each token to the bit mask of its positions in ``tokens``."""
    masks: dict[str, int] = {}
    for position, token in enumerate(tokens):
        masks[token] = masks.get(token, 0) | (1 << position)
    return masks


def _lcs_with_masks(masks: dict[str, int], full: int, other: Iterable[str]) -> int:
    """Hyyrö's LCS recurrence; zero bits of ``v`` count the LCS length."""
    v = full
    for token in other:
        match = masks.get(token)
        if match:
            u = v & match
            v = ((v + u) | (v - u)) & full
    return full.bit_count() - v.bit_count()


def _fmeasure(lcs: int, target_len: int, prediction_len: int) -> float:
    """F-measure from an LCS length with rouge-score's exact float arithmetic.

    Mirrors ``rouge_scorer._score_lcs`` + ``scoring.fmeasure``: zero for an
    empty side, else ``p = lcs / len(prediction)``, ``r = lcs / len(target)``
    and ``2 * p * r / (p + r)`` (``0.0`` when ``p + r == 0``).  The formula is
    symmetric in floats too (``2 * p`` is exact and ``*``/``+`` commute).
    """
    if not target_len or not prediction_len:
        return 0.0
    precision = lcs / prediction_len
    recall = lcs / target_len
    if precision + recall > 0:
        return 2 * precision * recall / (precision + recall)
    return 0.0


def rouge_l_f(a_tokens: Sequence[str], b_tokens: Sequence[str]) -> float:
    """ROUGE-L F-measure, equal to ``rouge_scorer._score_lcs(a, b).fmeasure``.

    ``a_tokens`` is rouge-score's *target*, ``b_tokens`` its *prediction*.
    """
    return _fmeasure(lcs_length(a_tokens, b_tokens), len(a_tokens), len(b_tokens))


def _min_lcs_over(threshold: float, m: int, n: int) -> int:
    """Smallest LCS length whose float F-measure is ``> threshold``.

    Returns ``min(m, n) + 1`` when no achievable LCS length passes.  Every LCS
    length below the returned value scores ``<= threshold``, whatever the
    rounding does, so ``upper_bound < _min_lcs_over(...)`` prunes exactly.
    """
    for lcs in range(min(m, n) + 1):
        if _fmeasure(lcs, m, n) > threshold:
            return lcs
    return min(m, n) + 1


def _multiset_keys(tokens: Sequence[str]) -> list[Hashable]:
    """Turn a token multiset into a set: the k-th repeat of ``t`` becomes ``(t, k)``.

    Set intersection sizes of these keys equal multiset overlaps, an upper
    bound on the LCS length.
    """
    seen: dict[str, int] = {}
    keys: list[Hashable] = []
    for token in tokens:
        count = seen.get(token, 0)
        seen[token] = count + 1
        keys.append(token if count == 0 else (token, count))
    return keys


@dataclass(frozen=True, slots=True)
class DedupeDecision:
    """Outcome of checking one candidate against the pool.

    ``best_score`` / ``best_match``: for a dropped candidate, the first pool
    entry found whose F-measure is above the threshold (the search stops
    there, so it need not be the maximum).  For a kept candidate, the maximum
    over the pairs whose LCS was actually computed; pairs pruned by the exact
    bounds are known to score ``<= threshold`` but may exceed ``best_score``.
    ``0.0`` / ``None`` when no pair was computed.
    """

    keep: bool
    best_score: float
    best_match: str | None


class _IntVector:
    """Append-only int32 array with amortised O(1) appends and zero-copy views."""

    __slots__ = ("_data", "size")

    def __init__(self) -> None:
        self._data = np.empty(4, dtype=np.int32)
        self.size = 0

    def append(self, value: int) -> None:
        if self.size == len(self._data):
            grown = np.empty(2 * self.size, dtype=np.int32)
            grown[: self.size] = self._data
            self._data = grown
        self._data[self.size] = value
        self.size += 1

    def view(self) -> np.ndarray:
        return self._data[: self.size]


def _count_hits(
    hits: np.ndarray, pool_size: int, min_count: int
) -> tuple[np.ndarray, np.ndarray]:
    """Distinct pool indices occurring ``>= min_count`` times in ``hits``, with counts.

    ``bincount`` costs O(pool size) at a few nanoseconds per entry and beats
    sorting unless the pool is much larger than the hit list.
    """
    if pool_size <= 32 * len(hits):
        counts = np.bincount(hits)
        ids = np.flatnonzero(counts >= min_count)
        return ids, counts[ids]
    ids, counts = np.unique(hits, return_counts=True)
    keep = counts >= min_count
    return ids[keep], counts[keep]


class NearDuplicateFilter:
    """Online Self-Instruct ROUGE-L filter over a growing instruction pool.

    ``check(text)`` keeps ``text`` (and adds it to the pool) unless some pool
    entry has ROUGE-L F-measure strictly greater than ``threshold`` with it --
    the same decision as scoring it against every pool entry with
    ``rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)``, but pruning
    pairs with exact bounds (see the module docstring).  ``add(text)`` puts a
    text into the pool unchecked (e.g. seed instructions).
    """

    def __init__(
        self, existing: Iterable[str] = (), threshold: float = DEFAULT_THRESHOLD
    ) -> None:
        self._threshold = float(threshold)
        self._texts: list[str] = []
        self._tokens: list[list[str]] = []
        self._keysets: list[frozenset[Hashable]] = []
        self._lengths: list[int] = []
        self._length_array = _IntVector()
        self._postings: dict[Hashable, _IntVector] = {}
        self._pool_lengths: set[int] = set()
        self._max_len = 0
        self._need_rows: dict[int, tuple[list[int], np.ndarray]] = {}
        self._probe_need: dict[int, int] = {}
        for text in existing:
            self.add(text)

    def __len__(self) -> int:
        return len(self._texts)

    @property
    def threshold(self) -> float:
        """Drop a candidate whose F-measure with a pool entry is above this (read-only)."""
        return self._threshold

    @property
    def pool(self) -> tuple[str, ...]:
        """Texts in the pool, in insertion order."""
        return tuple(self._texts)

    def add(self, text: str) -> None:
        """Add ``text`` to the pool without checking it."""
        tokens = tokenize(text)
        self._insert(text, tokens, _multiset_keys(tokens))

    def check(self, text: str) -> DedupeDecision:
        """Decide whether ``text`` is kept; kept texts join the pool."""
        tokens = tokenize(text)
        keys = _multiset_keys(tokens)
        decision = self._search(tokens, keys)
        if decision.keep:
            self._insert(text, tokens, keys)
        return decision

    def _insert(self, text: str, tokens: list[str], keys: list[Hashable]) -> None:
        index, n = len(self._texts), len(tokens)
        self._texts.append(text)
        self._tokens.append(tokens)
        self._keysets.append(frozenset(keys))
        self._lengths.append(n)
        self._length_array.append(n)
        for key in keys:
            postings = self._postings.get(key)
            if postings is None:
                postings = self._postings[key] = _IntVector()
            postings.append(index)
        if n and n not in self._pool_lengths:
            self._pool_lengths.add(n)
            self._probe_need.clear()
            if n > self._max_len:
                self._max_len = n
                self._need_rows.clear()

    def _need_row(self, m: int) -> tuple[list[int], np.ndarray]:
        """``row[n]``: least LCS scoring above the threshold for lengths ``m``, ``n``."""
        cached = self._need_rows.get(m)
        if cached is None:
            row = [_min_lcs_over(self.threshold, m, n) for n in range(self._max_len + 1)]
            cached = self._need_rows[m] = (row, np.array(row, dtype=np.int32))
        return cached

    def _min_need(self, m: int) -> int:
        """Least passing LCS over the pool lengths where passing is possible at all."""
        need = self._probe_need.get(m)
        if need is None:
            row = self._need_row(m)[0]
            feasible = (row[n] for n in self._pool_lengths if row[n] <= min(m, n))
            need = min(feasible, default=m + 1)
            self._probe_need[m] = need
        return need

    def _search(self, tokens: list[str], keys: list[Hashable]) -> DedupeDecision:
        if not self._texts:
            return DedupeDecision(True, 0.0, None)
        if 0.0 > self.threshold:
            # Every pair, even one with no shared or no tokens at all, scores
            # 0.0 or more, so the first pool entry already exceeds the threshold.
            score = rouge_l_f(tokens, self._tokens[0])
            return DedupeDecision(False, score, self._texts[0])
        if not tokens:
            return DedupeDecision(True, 0.0, None)
        return self._verify(tokens, self._candidates(tokens, keys))

    def _candidates(self, tokens: list[str], keys: list[Hashable]) -> list[tuple[int, int]]:
        """Pool entries whose exact token overlap reaches a passing LCS length.

        A pool entry hit by ``c`` of the probed keys shares at most
        ``c + unprobed`` keys with the candidate (keys absent from the pool
        share nothing), and LCS <= shared keys; entries never hit share at most
        ``unprobed < min_need``.  Returns ``(overlap, index)`` pairs,
        most-overlapping first.
        """
        m = len(tokens)
        min_need = self._min_need(m)
        probe, unprobed = self._probe(keys, min_need)
        if not probe:
            return []
        hit_ids, hit_counts = _count_hits(
            np.concatenate(probe), len(self._texts), min_need - unprobed
        )
        row, row_array = self._need_row(m)
        lengths = self._length_array.view()[hit_ids]
        survivors = hit_ids[hit_counts + unprobed >= row_array[lengths]].tolist()
        keyset = frozenset(keys)
        found: list[tuple[int, int]] = []
        for index in survivors:
            overlap = len(keyset & self._keysets[index])
            if overlap >= row[self._lengths[index]]:
                found.append((overlap, index))
        found.sort(reverse=True)
        return found

    def _probe(self, keys: list[Hashable], min_need: int) -> tuple[list[np.ndarray], int]:
        """Posting lists to scan (rarest keys first) and the number of pool keys left out.

        At least all but ``min_need - 1`` of the candidate's pool-known keys
        must be probed.  More keys are added while the scanned postings stay
        within twice the pool size -- counting costs O(pool) anyway, and each
        extra key tightens the ``hits + unprobed`` bound.
        """
        postings = self._postings
        present = sorted(
            (postings[key] for key in keys if key in postings), key=attrgetter("size")
        )
        required = len(present) - min_need + 1
        if required <= 0:
            return [], len(present)
        budget, scanned, probed = 2 * len(self._texts), 0, 0
        for vector in present:
            if probed >= required and scanned + vector.size > budget:
                break
            scanned += vector.size
            probed += 1
        return [vector.view() for vector in present[:probed]], len(present) - probed

    def _verify(
        self, tokens: list[str], candidates: list[tuple[int, int]]
    ) -> DedupeDecision:
        """Exact ROUGE-L on the survivors; stop at the first one above threshold."""
        m = len(tokens)
        masks, full = _match_masks(tokens), (1 << m) - 1
        best_score, best_index = 0.0, None
        for _, index in candidates:
            other = self._tokens[index]
            score = _fmeasure(_lcs_with_masks(masks, full, other), m, len(other))
            if score > self.threshold:
                return DedupeDecision(False, score, self._texts[index])
            if best_index is None or score > best_score:
                best_score, best_index = score, index
        match = None if best_index is None else self._texts[best_index]
        return DedupeDecision(True, best_score, match)


def filter_near_duplicates(
    candidates: Iterable[str],
    existing: Iterable[str] = (),
    threshold: float = DEFAULT_THRESHOLD,
) -> list[DedupeDecision]:
    """Run the Self-Instruct filter over ``candidates`` in order.

    ``existing`` (e.g. the seed tasks) seeds the pool unchecked; each kept
    candidate joins the pool before the next one is checked.  Returns one
    decision per candidate.
    """
    dedupe = NearDuplicateFilter(existing, threshold)
    return [dedupe.check(text) for text in candidates]
