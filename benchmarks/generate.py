"""Generation throughput, side by side in one run: transformers direct, vLLM direct, and vLLM
through the generation runner (engine actors, batches in flight; issue 2's benchmark, issue 14's
runner).

    python benchmarks/generate.py [--model builtin:smollm2-135m] [--prompts 64] [--new-tokens 96]

Same prompts (seed instructions in the model's chat format), same sampling, same per-prompt
seeds. Model load / engine start is excluded from the direct figures; for the runner both the
steady-state rate (first batch start to last batch end, as the workers time them) and the
end-to-end rate including actor and engine start-up are printed.
Targets on a 2-core CPU: vLLM direct >= 1.4x transformers; runner steady state >= 0.9x vLLM direct.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from dromedary_ray.config import EngineConfig, RayConfig, SamplingConfig
from dromedary_ray.data.schemas import PromptRow
from dromedary_ray.data.store import StageStore
from dromedary_ray.models import resolve_model
from dromedary_ray.principles import load_seed_tasks
from dromedary_ray.prompts import render_chat


class ChatTask:
    """The benchmark's task: answer each query in the chat format, keep everything."""

    def __init__(self, tokenizer, sampling: SamplingConfig):
        self.tokenizer, self.sampling = tokenizer, sampling

    def process(self, engine, batch):
        from dromedary_ray.data.schemas import RejectRow
        from dromedary_ray.runtime.generate import BatchResult

        prompts = chat_prompts(self.tokenizer, batch["query"].to_pylist())
        seeds = [int(i.rsplit("_", 1)[-1]) for i in batch["id"].to_pylist()]
        gens = engine.generate(prompts, self.sampling, seeds)
        tokens = sum(len(c.token_ids) for g in gens for c in g.completions)
        # Rows are not kept: the benchmark measures generation, not Parquet writes.
        return BatchResult(batch.slice(0, 0), RejectRow.empty(),
                           sum(g.prompt_tokens for g in gens), tokens)


def chat_prompts(tokenizer, queries):
    return [render_chat(tokenizer, [{"role": "user", "content": q}]) for q in queries]


def direct(engine, queries, sampling) -> tuple[int, float]:
    prompts = chat_prompts(engine.tokenizer, queries)
    start = time.perf_counter()
    gens = engine.generate(prompts, sampling, list(range(len(prompts))))
    seconds = time.perf_counter() - start
    return sum(len(c.token_ids) for g in gens for c in g.completions), seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="builtin:smollm2-135m")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=8,
                    help="runner rows per batch (configs/local.yaml's)")
    args = ap.parse_args()

    model = resolve_model(args.model)
    queries = [t.query for t in load_seed_tasks("principles/seed_tasks.jsonl")][: args.prompts]
    # Sample as the stages do (EOS allowed): the same seeds give each path the same lengths.
    sampling = SamplingConfig(temperature=0.7, top_p=0.95, max_new_tokens=args.new_tokens)
    cfg = EngineConfig(max_model_len=2048, cpus_per_engine=2, kv_cache_gib=2)
    results: dict[str, tuple[int, float]] = {}

    from dromedary_ray.engines.hf_engine import HFEngine

    hf = HFEngine(model, EngineConfig(backend="transformers", max_model_len=2048))
    results["transformers direct"] = direct(hf, queries, sampling)
    hf.close()

    from dromedary_ray.engines.vllm_engine import VLLMEngine

    vllm = VLLMEngine(model, cfg)
    results["vLLM direct"] = direct(vllm, queries, sampling)
    vllm.close()
    del vllm

    from dromedary_ray.runtime.cluster import connect
    from dromedary_ray.runtime.generate import TaskSpec, run_generation

    connect(RayConfig())
    rows = PromptRow.to_table([PromptRow(f"q_{i}", "seed", q) for i, q in enumerate(queries)])
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        summaries = run_generation(
            rows, store=StageStore(tmp, "bench"), model_path=model,
            engine_cfg=EngineConfig(max_model_len=2048, cpus_per_engine=2, kv_cache_gib=2,
                                    batch_size=args.batch_size),
            task=TaskSpec(ChatTask, {"sampling": sampling}), desc="runner",
        )
        wall = time.perf_counter() - start
    tokens = sum(s.completion_tokens for s in summaries)
    window = max(s.started + s.seconds for s in summaries) - min(s.started for s in summaries)
    results["vLLM via the runner"] = (tokens, window)
    results["  (end to end, incl. start-up)"] = (tokens, wall)

    base = results["transformers direct"][0] / results["transformers direct"][1]
    vdirect = results["vLLM direct"][0] / results["vLLM direct"][1]
    print(f"\n{args.prompts} prompts x up to {args.new_tokens} new tokens, model {args.model}")
    print(f"{'path':<34}{'tokens':>8}{'seconds':>9}{'tok/s':>9}{'vs HF':>8}{'vs vLLM':>9}")
    for name, (tok, sec) in results.items():
        rate = tok / sec
        print(f"{name:<34}{tok:>8}{sec:>9.1f}{rate:>9.1f}"
              f"{rate / base:>7.2f}x{rate / vdirect:>8.2f}x")


if __name__ == "__main__":
    main()
