"""Serving latency and throughput against the same engine called directly, in one run.

    python benchmarks/serve.py [--model builtin:smollm2-135m] [--max-tokens 64] [--reps 2]

Both paths run the same engine: vLLM's `AsyncLLM` built by `serve.engine.start_engine` with the
same settings, fed the same token ids (`encode_chat`) and the same greedy `SamplingParams`
(`sampling_params`), so every path generates the same tokens and only HTTP + Serve differ.
1. Direct: one such engine in this process.
2. Served: `dromedary_ray.serve.app` on Ray Serve at 127.0.0.1; 1, 8 and 32 concurrent clients
   (one pooled keep-alive httpx client).
Direct and served requests alternate (the one-client requests pair by pair, the batches round
by round) so that load from other processes on the machine falls on both alike. Where that load
swamps the difference, the split of each served request still holds: its latency minus the
engine time the server reports in its Server-Timing header is the time spent in HTTP + Serve.
Targets (2-core CPU): throughput at 32 clients >= 0.8x the direct batch throughput; p50 overhead
of HTTP + Serve at one client < 20 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from typing import Any

from dromedary_ray.config import EngineConfig, RayConfig
from dromedary_ray.models import resolve_model
from dromedary_ray.principles import load_seed_tasks

ENGINE = {"max_model_len": 2048, "cpus_per_engine": 2, "kv_cache_gib": 1}  # 23k tokens: ample


class Direct:
    """The replica's engine and per-request work (template, tokenizing, sampling), no server."""

    def __init__(self, model: str):
        from dromedary_ray.serve.engine import start_engine

        self.engine, self.tokenizer = start_engine(model, EngineConfig(**ENGINE))

    async def request(self, query: str, max_tokens: int) -> int:
        from vllm.inputs import TokensPrompt

        from dromedary_ray.serve.api import ChatRequest
        from dromedary_ray.serve.engine import encode_chat, sampling_params

        messages = [{"role": "user", "content": query}]
        req = ChatRequest(model="bench", messages=messages, max_tokens=max_tokens,
                          temperature=0.0)
        ids = encode_chat(self.tokenizer, messages)
        final = None
        async for out in self.engine.generate(TokensPrompt(prompt_token_ids=ids),
                                              sampling_params(req, max_tokens), uuid.uuid4().hex):
            final = out
        return len(final.outputs[0].token_ids)

    async def batch(self, queries: list[str], max_tokens: int) -> float:
        start = time.perf_counter()
        counts = await asyncio.gather(*(self.request(q, max_tokens) for q in queries))
        return sum(counts) / (time.perf_counter() - start)


async def served_request(client: Any, url: str, query: str,
                         max_tokens: int) -> tuple[int, float]:
    """Completion tokens, and the engine's seconds as the server reports them (Server-Timing)."""
    body = {"model": "bench", "messages": [{"role": "user", "content": query}],
            "max_tokens": max_tokens, "temperature": 0.0}
    resp = await client.post(f"{url}/v1/chat/completions", json=body)
    resp.raise_for_status()
    engine_ms = float(resp.headers["server-timing"].split("dur=")[1])
    return resp.json()["usage"]["completion_tokens"], engine_ms / 1000


async def client_run(client: Any, url: str, queries: list[str], concurrency: int,
                     max_tokens: int) -> tuple[list[float], float]:
    latencies: list[float] = []
    tokens = 0
    queue = list(queries)

    async def worker() -> None:
        nonlocal tokens
        while queue:
            q = queue.pop()
            start = time.perf_counter()
            count, _ = await served_request(client, url, q, max_tokens)
            latencies.append(time.perf_counter() - start)
            tokens += count  # not `tokens += await ...`: that reads `tokens` before the await

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, tokens / (time.perf_counter() - start)


async def one_client_pairs(direct: Direct, client: Any, url: str, queries: list[str],
                           max_tokens: int, reps: int) -> dict[str, list[float]]:
    """Latency of each query both ways, alternating which path goes first; for served requests
    also the time outside the engine (HTTP, Serve, request handling)."""
    times: dict[str, list[float]] = {"direct": [], "served": [], "outside_engine": []}
    for i in range(reps * len(queries)):
        q = queries[i % len(queries)]
        for path in ("direct", "served") if i % 2 == 0 else ("served", "direct"):
            start = time.perf_counter()
            if path == "direct":
                await direct.request(q, max_tokens)
            else:
                _, engine_s = await served_request(client, url, q, max_tokens)
            times[path].append(time.perf_counter() - start)
        times["outside_engine"].append(times["served"][-1] - engine_s)
    return times


def percentiles(latencies: list[float]) -> tuple[float, float]:
    lat = sorted(latencies)
    return statistics.median(lat), lat[int(0.99 * (len(lat) - 1))]


async def measure(direct: Direct, url: str, queries: list[str], max_tokens: int,
                  reps: int) -> dict[str, Any]:
    import httpx

    out: dict[str, Any] = {"direct_rate": [], "latency": {1: [], 8: [], 32: []},
                           "rate": {8: [], 32: []}}
    async with httpx.AsyncClient(timeout=600) as client:
        for q in queries[:2]:  # warm-up of both paths
            await direct.request(q, max_tokens)
            await served_request(client, url, q, max_tokens)
        out["one_client"] = await one_client_pairs(direct, client, url, queries[:5],
                                                   max_tokens, reps)
        out["latency"][1] = out["one_client"]["served"]
        for rep in range(reps):
            steps: list[int | None] = [None, 8, 32] if rep % 2 == 0 else [8, 32, None]
            for concurrency in steps:  # None: the direct batch of 32
                if concurrency is None:
                    out["direct_rate"].append(await direct.batch(queries, max_tokens))
                    continue
                lat, rate = await client_run(client, url, queries, concurrency, max_tokens)
                out["latency"][concurrency] += lat
                out["rate"][concurrency].append(rate)
    return out


def start_server(model: str) -> str:
    from dromedary_ray.runtime.cluster import connect
    from dromedary_ray.serve.app import build_app, deploy

    connect(RayConfig())
    return deploy(build_app({"model": model, "served_model_name": "bench", "engine": ENGINE}),
                  "bench")


def report(args: argparse.Namespace, out: dict[str, Any]) -> None:
    direct_p50 = statistics.median(out["one_client"]["direct"])
    direct_rate = statistics.median(out["direct_rate"])
    print(f"\n{args.model}, greedy, up to {args.max_tokens} new tokens, 32 prompts, "
          f"{args.reps} rounds")
    print(f"direct engine: single-request p50 {direct_p50 * 1000:.0f} ms, "
          f"batch of 32 {direct_rate:.1f} tok/s")
    print(f"{'clients':>8}{'p50 ms':>9}{'p99 ms':>9}{'tok/s':>9}{'vs direct':>11}")
    for c, lat in out["latency"].items():
        p50, p99 = percentiles(lat)
        line = f"{c:>8}{p50 * 1000:>9.0f}{p99 * 1000:>9.0f}"
        if c in out["rate"]:
            rate = statistics.median(out["rate"][c])
            line += f"{rate:>9.1f}{rate / direct_rate:>10.2f}x"
        print(line)
    one = out["one_client"]
    overhead = (statistics.median(one["served"]) - direct_p50) * 1000
    pairs = zip(one["served"], one["direct"], strict=True)
    paired = statistics.median([s - d for s, d in pairs]) * 1000
    print(f"p50 overhead of HTTP + Serve at one client: {overhead:.0f} ms "
          f"(median of paired differences {paired:.0f} ms; target < 20 ms)")
    outside_p50, outside_p99 = percentiles(one["outside_engine"])
    print(f"time of a served request outside the engine (its latency minus the engine time in "
          f"its Server-Timing header): p50 {outside_p50 * 1000:.1f} ms, "
          f"p99 {outside_p99 * 1000:.1f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="builtin:smollm2-135m")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=2,
                    help="rounds: each sends the 5 one-client prompts both ways and runs the "
                         "direct batch and the 8- and 32-client runs once")
    args = ap.parse_args()
    model = resolve_model(args.model)
    queries = [t.query for t in load_seed_tasks("principles/seed_tasks.jsonl")][:32]
    direct = Direct(model)  # first: it claims the cores, and the replica inherits the binding
    url = start_server(model)
    try:
        out = asyncio.run(measure(direct, url, queries, args.max_tokens, args.reps))
    finally:
        from ray import serve

        serve.shutdown()
        direct.engine.shutdown()
    report(args, out)


if __name__ == "__main__":
    main()
