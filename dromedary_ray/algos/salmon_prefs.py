"""SALMON's synthetic preferences: judge scores, per-principle scaling, RM-data aggregation.

SALMON (Sun et al. 2023, §3.1-3.2) asks the SFT model which of two responses better satisfies
ONE principle, reading the log-probs of the two choice letters, once in each presentation order
to cancel the judge's position bias. A reward-model training example then pairs the two
responses with a random handful of principles, some of them negated; the preferred response is
the one favoured by the principle with the strongest (scaled) judgement. Negation and the mix of
principles force the RM to read its principle list instead of learning one fixed taste.

Pure Python: no Ray, no torch. Everything is deterministic given a seed and independent of the
order of the input rows (each example draws from its own RNG, seeded by a hash of the seed, the
pair id and the draw number).
"""

from __future__ import annotations

import hashlib
import math
import random
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from dromedary_ray.salmon_principles import SalmonPrincipleSet

# Defaults from IBM/SALMON training/step1_synthetic_preference_collection/
# aggregate_synthetic_preference.py: principles per example ~ Geometric(0.2) rejected above
# max_principles=8, each negated with probability 0.5, noisy_ratio=0.1 of labels flipped, and
# four passes over the judged pairs.
SALMON_PRINCIPLES_PER_EXAMPLE = (1, 8)
SALMON_GEOMETRIC_P = 0.2
SALMON_NEGATE_PROB = 0.5
SALMON_FLIP_PROB = 0.1
SALMON_DRAWS_PER_PAIR = 4

REJECT_NO_CONSISTENT = "no_consistent_judgement"


@dataclass(frozen=True)
class JudgeScore:
    """How strongly the judge prefers response A under one principle (positive: A better)."""

    forward: float  # lp(A) - lp(B) with A shown first
    backward: float  # swapped order (B shown first), mapped back to A's side
    consistent: bool  # both orders prefer the same response
    score: float  # mean of forward and backward


def judge_score(logp_a_first: Mapping[str, float], logp_b_first: Mapping[str, float],
                choices: Sequence[str] = ("A", "B")) -> JudgeScore:
    """Combine the judge's choice log-probs from both presentation orders.

    `logp_a_first`: {choice: log-prob} when response A sits in the first slot (letter
    choices[0]); `logp_b_first`: the same prompt with the responses swapped, so response A now
    sits in the second slot. A tie in either order counts as inconsistent: it states no
    preference.
    """
    first, second = choices
    forward = logp_a_first[first] - logp_a_first[second]
    backward = logp_b_first[second] - logp_b_first[first]
    consistent = forward * backward > 0
    return JudgeScore(forward, backward, consistent, (forward + backward) / 2.0)


@dataclass(frozen=True)
class JudgedPair:
    """One judgement: a response pair compared under one principle, in both orders."""

    pair_id: str
    prompt_id: str
    prompt: str
    response_a: str
    response_b: str
    principle: str
    score: JudgeScore


@dataclass(frozen=True)
class RMExample:
    """A principle-conditioned preference for reward-model training."""

    pair_id: str
    draw: int
    prompt_id: str
    prompt: str
    chosen: str
    rejected: str
    principles: tuple[str, ...]
    negated: tuple[bool, ...]
    decisive_principle: str
    margin: float  # |scaled score| of the decisive principle
    flipped: bool  # label noise applied: chosen/rejected are the opposite of the judgement


@dataclass(frozen=True)
class RMReject:
    pair_id: str
    prompt_id: str
    reason: str


@dataclass(frozen=True)
class Aggregated:
    examples: tuple[RMExample, ...]
    rejects: tuple[RMReject, ...]


def normalize_per_principle(rows: Iterable[JudgedPair]) -> list[JudgedPair]:
    """Divide each principle's scores by their root mean square over all its rows.

    Principles differ in how confidently the judge speaks about them, and the label comes from
    the largest |score| across principles, so scores must be on a common scale first. SALMON
    divides by the variance of a principle's scores; we divide by the RMS of the per-order
    scores, which keeps zero at zero (no judgement changes sign, unlike a z-score) and makes the
    result unitless. A principle whose scores are all zero is left as it is.
    """
    rows = list(rows)
    squares: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        squares[r.principle] += [r.score.forward ** 2, r.score.backward ** 2]
    # fsum is correctly rounded, so the scale does not depend on the order of the rows.
    scale = {name: math.sqrt(math.fsum(sq) / len(sq)) for name, sq in squares.items()}
    out = []
    for r in rows:
        s = scale[r.principle] or 1.0
        sc = r.score
        out.append(replace(r, score=JudgeScore(sc.forward / s, sc.backward / s, sc.consistent,
                                               sc.score / s)))
    return out


def aggregate_rm_examples(
    judged_rows: Iterable[JudgedPair],
    principle_set: SalmonPrincipleSet,
    seed: int,
    principles_per_example: tuple[int, int] = SALMON_PRINCIPLES_PER_EXAMPLE,
    negate_prob: float = SALMON_NEGATE_PROB,
    flip_prob: float = SALMON_FLIP_PROB,
    draws_per_pair: int = SALMON_DRAWS_PER_PAIR,
    geometric_p: float = SALMON_GEOMETRIC_P,
    normalize: bool = True,
) -> Aggregated:
    """Turn single-principle judgements into principle-conditioned RM preference examples.

    Per response pair and draw: k principles (k from a Geometric(geometric_p) truncated to the
    `principles_per_example` range and to the number available) are sampled among the pair's
    consistent judgements; each is negated with `negate_prob` (its score changes sign); the
    principle with the largest |score| decides which response is chosen; the label is then
    flipped with `flip_prob`, the label noise SALMON adds. A pair with no consistent judgement
    gives a reject. Output sorted by (pair_id, draw).
    """
    lo, hi = principles_per_example
    if not 1 <= lo <= hi:
        raise ValueError(f"principles_per_example must be (lo, hi) with 1 <= lo <= hi, got "
                         f"{principles_per_example}")
    for name, prob in (("negate_prob", negate_prob), ("flip_prob", flip_prob),
                       ("geometric_p", geometric_p)):
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {prob}")
    rows = list(judged_rows)
    if normalize:
        rows = normalize_per_principle(rows)
    pairs = _group_pairs(rows, principle_set)
    examples, rejects = [], []
    for pair_id in sorted(pairs):
        group = pairs[pair_id]
        pool = [r for r in group if r.score.consistent]
        if not pool:
            rejects.append(RMReject(pair_id, group[0].prompt_id, REJECT_NO_CONSISTENT))
            continue
        for draw in range(draws_per_pair):
            rng = random.Random(_example_seed(seed, pair_id, draw))
            examples.append(_one_example(pool, draw, rng, lo, hi, negate_prob, flip_prob,
                                         geometric_p))
    return Aggregated(tuple(examples), tuple(rejects))


def _group_pairs(rows: list[JudgedPair], pset: SalmonPrincipleSet
                 ) -> dict[str, list[JudgedPair]]:
    """Rows by pair id, each group in the principle set's order; checks names and duplicates."""
    order = {p.name: i for i, p in enumerate(pset.principles + pset.interventions)}
    pairs: dict[str, list[JudgedPair]] = defaultdict(list)
    for r in rows:
        if r.principle not in order:
            raise ValueError(f"pair {r.pair_id!r} was judged under {r.principle!r}, which is not "
                             "in the principle set")
        pairs[r.pair_id].append(r)
    for pair_id, group in pairs.items():
        group.sort(key=lambda r: order[r.principle])
        head = group[0]
        names = [r.principle for r in group]
        if len(set(names)) != len(names):
            raise ValueError(f"pair {pair_id!r} has more than one judgement per principle")
        for r in group[1:]:
            if (r.prompt_id, r.prompt, r.response_a, r.response_b) != (
                    head.prompt_id, head.prompt, head.response_a, head.response_b):
                raise ValueError(f"pair {pair_id!r} names different prompts or responses in "
                                 "different rows")
    return pairs


def _example_seed(seed: int, pair_id: str, draw: int) -> int:
    digest = hashlib.sha256(f"{seed}\x00{pair_id}\x00{draw}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def _truncated_geometric(rng: random.Random, p: float, lo: int, hi: int) -> int:
    """k in [lo, hi] with P(k) proportional to (1-p)^(k-1) p, from one uniform draw."""
    weights = [(1.0 - p) ** (k - lo) for k in range(lo, hi + 1)]
    u, acc = rng.random() * sum(weights), 0.0
    for k, w in zip(range(lo, hi + 1), weights, strict=True):
        acc += w
        if u < acc:
            return k
    return hi


def _one_example(pool: list[JudgedPair], draw: int, rng: random.Random, lo: int, hi: int,
                 negate_prob: float, flip_prob: float, geometric_p: float) -> RMExample:
    top = min(hi, len(pool))
    k = _truncated_geometric(rng, geometric_p, min(lo, top), top)
    picked = rng.sample(pool, k)
    negated = [rng.random() < negate_prob for _ in picked]
    signed = [-r.score.score if neg else r.score.score for r, neg in zip(picked, negated,
                                                                         strict=True)]
    decisive = max(range(k), key=lambda i: abs(signed[i]))  # first one on ties
    a_wins = signed[decisive] > 0
    flipped = rng.random() < flip_prob
    if flipped:
        a_wins = not a_wins
    head = pool[0]
    chosen, rejected = ((head.response_a, head.response_b) if a_wins
                        else (head.response_b, head.response_a))
    return RMExample(
        pair_id=head.pair_id, draw=draw, prompt_id=head.prompt_id, prompt=head.prompt,
        chosen=chosen, rejected=rejected, principles=tuple(r.principle for r in picked),
        negated=tuple(negated), decisive_principle=picked[decisive].principle,
        margin=abs(signed[decisive]), flipped=flipped,
    )
