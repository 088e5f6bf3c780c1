"""Benchmark: Self-Instruct ROUGE-L near-duplicate filter vs. the Alpaca reference.

The reference is what Alpaca's ``generate_instruction.py`` does for each new
instruction: ``pool.map(partial(rouge_scorer._score_lcs, new_tokens), all_tokens)``
on a ``multiprocessing.Pool(2)`` over every instruction kept so far, dropping the
candidate when the best F-measure is ``> 0.7``.  Ours is
``dromedary_ray.algos.rouge_dedupe.filter_near_duplicates``.  Both run on the same
deterministic synthetic corpus and their keep/drop decisions must be identical.

Usage::

    python benchmarks/dedupe.py                      # sizes 2000 and 20000, real reference
    python benchmarks/dedupe.py --sizes 2000 --reference-max 2000
    python benchmarks/dedupe.py --reference-max 2000 --estimate-reference

``--estimate-reference`` replaces the reference run for sizes above
``--reference-max`` by an estimate: K candidates spread evenly over the run
are timed against the pool they really meet (known from our decisions, and
their reference decisions are checked), and the mean time is scaled to the
full run.  Without it, such sizes print ``n/a`` for the reference.  The real
reference at 20000 is quadratic: estimated at over an hour on two cores.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from dataclasses import dataclass
from functools import partial
from multiprocessing import Pool
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rouge_score import rouge_scorer  # noqa: E402

from dromedary_ray.algos.rouge_dedupe import filter_near_duplicates, tokenize  # noqa: E402

THRESHOLD = 0.7
NUM_SEEDS = 175  # Self-Instruct's seed-task count

_VERBS = (
    "write describe explain generate list classify summarize translate rewrite create "
    "compose suggest identify compare design outline evaluate analyze recommend draft "
    "calculate convert find detect extract propose brainstorm paraphrase edit predict"
).split()
_ADJECTIVES = (
    "short formal funny persuasive detailed simple creative concise friendly technical "
    "historical polite sarcastic optimistic critical informative catchy emotional "
    "practical scientific casual dramatic mysterious inspiring nostalgic playful"
).split()
_NOUNS = (
    "poem story essay email letter tweet slogan review summary recipe speech joke "
    "riddle headline paragraph dialogue list plan report advertisement song limerick "
    "haiku proposal description outline quiz biography tutorial"
).split()
_FILLERS = (
    "the a an of to for about with in on that this your my their its and or "
    "please briefly using following given each every some"
).split()
_TEMPLATES = (
    "{verb} a {adj} {noun} about {topic}.",
    "{verb} the following {noun} in a {adj} tone: {topic} and {topic2}.",
    "Can you {verb} a {noun} that explains {topic} to a {adj} audience?",
    "Given a {noun} about {topic}, {verb} it so that it sounds more {adj}.",
    "What is the difference between {topic} and {topic2}?",
    "{verb} three {adj} ideas for a {noun} on {topic}.",
    "Explain why {topic} matters for {topic2} in {n} sentences.",
    "Make a list of {n} {adj} facts about {topic}.",
    "Classify the following {noun} as {adj} or not: {topic}.",
    "How would you {verb} {topic} for someone who knows {topic2}?",
    "{verb} a {noun} for a {adj} event about {topic} with {n} key points.",
    "Pretend you are an expert in {topic}; {verb} a {adj} {noun} for beginners.",
    "Find the main argument of this {noun} about {topic} and {verb} it.",
    "Suggest {n} questions a {adj} interviewer could ask about {topic}.",
    "Turn these notes on {topic} into a {adj} {noun}: {topic2}, {topic3}.",
    "Is {topic} a good choice for {topic2}? {verb} your reasoning.",
    "{topic}: {verb} a {noun} around it.",
    "Tell me how {topic} relates to {topic2} and {topic3}.",
    "Rank {topic}, {topic2} and {topic3} by how {adj} they are.",
    "I need a {adj} {noun} on {topic} for my {topic2} class.",
    "Fix the grammar in this {noun}: {topic} {topic2}.",
    "Who first proposed {topic}, and why was it {adj}?",
    "Give an example of {topic} used in {topic2}.",
    "{verb} {topic} as if you were {topic2}.",
)
_SUFFIXES = (
    "",
    "",
    "",
    " Keep it under {n} words.",
    " Use a {adj} style.",
    " Include one example about {topic}.",
    " Avoid mentioning {topic}.",
    " Answer in {n} bullet points.",
)


def _pseudo_words(rng: random.Random, count: int) -> list[str]:
    """A long tail of invented domain terms, like real instructions' vocabulary."""
    syllables = "ka lo mi ren tor vex sa qui pla dor zen ful bri na tek mor ash vin".split()
    words = {"".join(rng.choices(syllables, k=rng.randint(2, 4))) for _ in range(count * 2)}
    return sorted(words)[:count]


def _topic(rng: random.Random, terms: list[str]) -> str:
    words = rng.sample(terms, rng.randint(1, 4))
    if rng.random() < 0.4:
        words.insert(0, rng.choice(_FILLERS))
    return " ".join(words)


def _fresh(rng: random.Random, terms: list[str]) -> str:
    template = rng.choice(_TEMPLATES) + rng.choice(_SUFFIXES)
    text = template.format(
        verb=rng.choice(_VERBS),
        adj=rng.choice(_ADJECTIVES),
        noun=rng.choice(_NOUNS),
        topic=_topic(rng, terms),
        topic2=_topic(rng, terms),
        topic3=_topic(rng, terms),
        n=rng.randint(2, 12),
    )
    return text[0].upper() + text[1:]


def _perturb(rng: random.Random, text: str, terms: list[str]) -> str:
    """A near-duplicate: one to three word-level edits of an earlier instruction."""
    words = text.split()
    for _ in range(rng.randint(1, 3)):
        op, pos = rng.random(), rng.randrange(len(words))
        if op < 0.4:
            words[pos] = rng.choice(terms + _FILLERS + _ADJECTIVES)
        elif op < 0.7 and len(words) > 3:
            del words[pos]
        else:
            words.insert(pos, rng.choice(_FILLERS + terms))
    return " ".join(words)


def make_corpus(size: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Deterministic (seeds, candidates) from templates and a long-tail vocabulary.

    About 15% of texts are small edits of earlier ones; with template
    collisions the filter drops roughly 25-30% of the candidates.
    """
    rng = random.Random(seed)
    terms = _pseudo_words(rng, 3000)
    texts: list[str] = []
    for _ in range(NUM_SEEDS + size):
        if len(texts) > 10 and rng.random() < 0.15:
            texts.append(_perturb(rng, rng.choice(texts), terms))
        else:
            texts.append(_fresh(rng, terms))
    return texts[:NUM_SEEDS], texts[NUM_SEEDS:]


def _reference_keeps(pool: Pool, new_tokens: list[str], kept_tokens: list[list[str]]) -> bool:
    """One Alpaca step: score against every kept instruction on the worker pool."""
    scores = pool.map(partial(rouge_scorer._score_lcs, new_tokens), kept_tokens)
    return not any(score.fmeasure > THRESHOLD for score in scores)


def reference_filter(seeds: list[str], candidates: list[str], pool: Pool) -> list[bool]:
    """Alpaca's generate_instruction.py loop (rouge-score, Pool of 2 workers)."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    all_tokens = [scorer._tokenizer.tokenize(text) for text in seeds]
    keep: list[bool] = []
    for text in candidates:
        new_tokens = scorer._tokenizer.tokenize(text)
        keep.append(_reference_keeps(pool, new_tokens, all_tokens))
        if keep[-1]:
            all_tokens.append(new_tokens)
    return keep


def estimate_reference(
    seeds: list[str], candidates: list[str], keep: list[bool], pool: Pool, samples: int
) -> float:
    """Time ``samples`` evenly spaced candidates against their true pool; scale up.

    The pool each candidate meets follows from our decisions; the sampled
    reference decisions are checked against ours as well.
    """
    pool_tokens = [tokenize(text) for text in seeds]
    pool_size_before: list[int] = []
    for text, kept in zip(candidates, keep, strict=True):
        pool_size_before.append(len(pool_tokens))
        if kept:
            pool_tokens.append(tokenize(text))
    step = (len(candidates) - 1) / max(samples - 1, 1)
    picks = sorted({round(i * step) for i in range(samples)})
    elapsed = 0.0
    for i in picks:
        start = time.perf_counter()
        ref_keep = _reference_keeps(
            pool, tokenize(candidates[i]), pool_tokens[: pool_size_before[i]]
        )
        elapsed += time.perf_counter() - start
        assert ref_keep == keep[i], f"decision mismatch at candidate {i}"
    return elapsed / len(picks) * len(candidates)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--reference-max", type=int, default=20000,
        help="largest size for which the reference really runs (default 20000)",
    )
    parser.add_argument(
        "--estimate-reference", action="store_true",
        help="estimate the reference above --reference-max instead of skipping it",
    )
    parser.add_argument("--estimate-samples", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3, help="ours: best of N runs")
    return parser.parse_args(argv)


@dataclass(frozen=True)
class Row:
    size: int
    reference_s: float | None
    estimated: bool
    ours_s: float
    kept: int


def _time_ours(seeds: list[str], candidates: list[str], repeats: int) -> tuple[float, list[bool]]:
    best = math.inf
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        decisions = filter_near_duplicates(candidates, seeds, THRESHOLD)
        best = min(best, time.perf_counter() - start)
    return best, [decision.keep for decision in decisions]


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    rows: list[Row] = []
    print(f"{NUM_SEEDS} seed instructions; reference = Alpaca loop on Pool(2); '~' = estimated")
    print(f"{'size':>7} {'reference s':>13} {'ours s':>9} {'speed-up':>9} {'kept':>7}")
    with Pool(2) as pool:
        for size in args.sizes:
            seeds, candidates = make_corpus(size, args.seed)
            ours, keep = _time_ours(seeds, candidates, args.repeats)
            ref, estimated = None, False
            if size <= args.reference_max:
                start = time.perf_counter()
                assert reference_filter(seeds, candidates, pool) == keep, "decisions differ"
                ref = time.perf_counter() - start
            elif args.estimate_reference:
                ref = estimate_reference(seeds, candidates, keep, pool, args.estimate_samples)
                estimated = True
            rows.append(Row(size, ref, estimated, ours, sum(keep)))
            _print_row(rows[-1])
    _print_growth(rows)


def _print_row(row: Row) -> None:
    ref = "n/a" if row.reference_s is None else f"{row.reference_s:.2f}"
    ref += "~" if row.estimated else ""
    ratio = "n/a" if row.reference_s is None else f"{row.reference_s / row.ours_s:.0f}x"
    print(f"{row.size:>7} {ref:>13} {row.ours_s:>9.3f} {ratio:>9} {row.kept:>7}", flush=True)


def _print_growth(rows: list[Row]) -> None:
    """Exponent k in time ~ size**k between consecutive sizes (2.0 = quadratic)."""
    for first, second in zip(rows, rows[1:], strict=False):
        scale = math.log(second.size / first.size)
        ours = math.log(second.ours_s / first.ours_s) / scale
        line = f"growth exponent {first.size} -> {second.size}: ours {ours:.2f}"
        if first.reference_s and second.reference_s:
            line += f", reference {math.log(second.reference_s / first.reference_s) / scale:.2f}"
        print(line)


if __name__ == "__main__":
    main()
