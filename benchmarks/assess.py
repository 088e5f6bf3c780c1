"""Grading throughput of I-SHEEP's self-assessment, side by side in one run (issue 5's
benchmark): the expected-score path (next-token digit log-probs, no sampling) against generating
the grade as text and parsing it, on the same model, pairs and rubrics.

    python benchmarks/assess.py [--model builtin:smollm2-135m] [--pairs 128] [--repeats 2]

Pairs are the shipped seed instructions with their reference outputs as the answers. Both paths
run through the assess stage's own task (`AssessTask.process`) on one vLLM engine, chunk by
chunk, the two paths alternating which goes first; the prefix cache is emptied before every
timed call so neither path reads the other's prompts from it. Printed: pairs per second for
each path, their ratio, and how often the two agree on the keep decision.
Target: expected-score >= 3x generated text.
"""

from __future__ import annotations

import argparse
import statistics
import time

from dromedary_ray.config import AssessConfig, EngineConfig
from dromedary_ray.data.schemas import AnswerRow, AssessRow
from dromedary_ray.models import resolve_model
from dromedary_ray.principles import load_rubrics, load_seed_tasks


def pairs(n: int) -> list[AnswerRow]:
    tasks = [t for t in load_seed_tasks("principles/seed_tasks.jsonl") if t.output][:n]
    return [AnswerRow(t.id, t.query, t.output, 0, len(t.output.split()), 0.0, "stop")
            for t in tasks]


def timed(engine, task, table) -> tuple[float, list[AssessRow], int]:
    engine.llm.reset_prefix_cache()
    start = time.perf_counter()
    result = task.process(engine, table)
    seconds = time.perf_counter() - start
    return seconds, AssessRow.from_table(result.kept), result.rejects.num_rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="builtin:smollm2-135m")
    ap.add_argument("--pairs", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=16, help="pairs per timed call")
    ap.add_argument("--threshold", type=float, default=8.0)
    args = ap.parse_args()

    from dromedary_ray.engines import make_engine
    from dromedary_ray.stages.assess import AssessTask

    rows = pairs(args.pairs)
    engine = make_engine(resolve_model(args.model),
                         EngineConfig(max_model_len=4096, kv_cache_gib=2, cpus_per_engine=2))
    rubrics = load_rubrics("principles/isheep_rubrics.yaml")
    tasks = {m: AssessTask(engine.tokenizer, AssessConfig(method=m, threshold=args.threshold),
                           rubrics) for m in ("generate", "expected")}
    task_list = list(tasks.items())
    task_list[0][1].process(engine, AnswerRow.to_table(rows[:4]))  # warm-up, not timed
    # Chunks alternate which path goes first, so load from other processes on a shared machine
    # falls on both paths alike; every chunk starts from an empty prefix cache.
    seconds = dict.fromkeys(tasks, 0.0)
    results: dict[str, tuple[list[AssessRow], int]] = {m: ([], 0) for m in tasks}
    for r in range(args.repeats):
        for c, start in enumerate(range(0, len(rows), args.chunk)):
            chunk = AnswerRow.to_table(rows[start:start + args.chunk])
            order = task_list if (r + c) % 2 == 0 else task_list[::-1]
            for method, task in order:
                secs, graded, rejected = timed(engine, task, chunk)
                seconds[method] += secs
                if r == 0:
                    results[method] = (results[method][0] + graded, results[method][1] + rejected)
    engine.close()

    print(f"\n{len(rows)} pairs x {len(tasks['generate'].rubrics)} rubrics, {args.model}, "
          f"vLLM on CPU, {args.repeats} passes in chunks of {args.chunk}")
    rate = {m: args.repeats * len(rows) / s for m, s in seconds.items()}
    for method in tasks:
        graded, rejected = results[method]
        kept = sum(r.kept for r in graded)
        print(f"  {method:<9} {rate[method]:7.1f} pairs/s  graded {len(graded):>4}  "
              f"unreadable {rejected:>4}  kept {kept:>4}")
    print(f"  expected / generate: {rate['expected'] / rate['generate']:.2f}x (target >= 3x)")
    gen = {r.id: r for r in results["generate"][0]}
    both = [(gen[r.id], r) for r in results["expected"][0] if r.id in gen]
    if both:
        agree = sum(g.kept == e.kept for g, e in both) / len(both)
        diff = statistics.mean(abs(g.scores[0] - e.scores[0]) for g, e in both)
        print(f"  on the {len(both)} pairs both graded: keep decisions agree {agree:.0%}, "
              f"mean |quality grade - expected quality| {diff:.2f}")


if __name__ == "__main__":
    main()
