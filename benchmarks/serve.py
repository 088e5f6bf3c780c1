"""Serving latency and throughput against the same engine called directly, in one run.

    python benchmarks/serve.py [--model builtin:smollm2-135m] [--max-tokens 64]

1. Direct: one vLLM engine in this process; a single request (latency) and a batch of 32
   (throughput).
2. Served: `dromedary_ray.serve.app` on Ray Serve at 127.0.0.1 with the same engine settings;
   1, 8 and 32 concurrent clients (httpx), each sending the same prompts greedily, so every
   path generates the same tokens.
Targets (2-core CPU): throughput at 32 clients >= 0.8x the direct batch throughput; p50 overhead
of HTTP + Serve at one client < 20 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import time

from dromedary_ray.config import EngineConfig, RayConfig, SamplingConfig
from dromedary_ray.models import resolve_model
from dromedary_ray.principles import load_seed_tasks
from dromedary_ray.prompts import render_chat

ENGINE = {"max_model_len": 2048, "cpus_per_engine": 2, "kv_cache_gib": 2}


def direct_figures(model: str, queries: list[str], max_tokens: int) -> dict[str, float]:
    from dromedary_ray.engines.vllm_engine import VLLMEngine

    engine = VLLMEngine(model, EngineConfig(**ENGINE))
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=max_tokens)
    prompts = [render_chat(engine.tokenizer, [{"role": "user", "content": q}]) for q in queries]
    engine.generate(prompts[:1], sampling)  # warm-up
    singles = []
    for p in prompts[:5]:
        start = time.perf_counter()
        engine.generate([p], sampling)
        singles.append(time.perf_counter() - start)
    start = time.perf_counter()
    gens = engine.generate(prompts, sampling)
    seconds = time.perf_counter() - start
    tokens = sum(len(g.completions[0].token_ids) for g in gens)
    engine.close()
    return {"latency_p50": statistics.median(singles), "tokens_per_s": tokens / seconds}


async def client_run(url: str, queries: list[str], concurrency: int, max_tokens: int):
    import httpx

    latencies: list[float] = []
    tokens = 0
    queue = list(queries)

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal tokens
        while queue:
            q = queue.pop()
            body = {"model": "bench", "messages": [{"role": "user", "content": q}],
                    "max_tokens": max_tokens, "temperature": 0.0}
            start = time.perf_counter()
            resp = await client.post(f"{url}/v1/chat/completions", json=body)
            latencies.append(time.perf_counter() - start)
            resp.raise_for_status()
            tokens += resp.json()["usage"]["completion_tokens"]

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=600) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return latencies, tokens / (time.perf_counter() - start)


def served_figures(model: str, queries: list[str], max_tokens: int) -> dict[int, tuple]:
    from ray import serve

    from dromedary_ray.runtime.cluster import connect
    from dromedary_ray.serve.app import build_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    connect(RayConfig())
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"model": model, "served_model_name": "bench", "engine": ENGINE}),
              name="bench", route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    asyncio.run(client_run(url, queries[:2], 1, max_tokens))  # warm-up
    out = {}
    for concurrency in (1, 8, 32):
        work = queries[:5] if concurrency == 1 else queries
        lat, rate = asyncio.run(client_run(url, work, concurrency, max_tokens))
        lat.sort()
        out[concurrency] = (statistics.median(lat), lat[int(0.99 * (len(lat) - 1))], rate)
    serve.shutdown()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="builtin:smollm2-135m")
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()
    model = resolve_model(args.model)
    queries = [t.query for t in load_seed_tasks("principles/seed_tasks.jsonl")][:32]
    direct = direct_figures(model, queries, args.max_tokens)
    served = served_figures(model, queries, args.max_tokens)
    print(f"\n{args.model}, greedy, up to {args.max_tokens} new tokens, 32 prompts")
    print(f"direct engine: single-request p50 {direct['latency_p50'] * 1000:.0f} ms, "
          f"batch of 32 {direct['tokens_per_s']:.1f} tok/s")
    print(f"{'clients':>8}{'p50 ms':>9}{'p99 ms':>9}{'tok/s':>9}{'vs direct':>11}")
    for c, (p50, p99, rate) in served.items():
        print(f"{c:>8}{p50 * 1000:>9.0f}{p99 * 1000:>9.0f}{rate:>9.1f}"
              f"{rate / direct['tokens_per_s']:>10.2f}x")
    overhead = (served[1][0] - direct["latency_p50"]) * 1000
    print(f"p50 overhead of HTTP + Serve at one client: {overhead:.0f} ms (target < 20 ms)")


if __name__ == "__main__":
    main()
