"""Serve under load: a bounded soak of the chat API on 127.0.0.1, mixed good and bad requests.

    python benchmarks/soak.py [--minutes 5] [--clients 32] [--model builtin:tiny-llama]
                              [--bad-fraction 0.35]

One Ray Serve replica of `dromedary_ray.serve.app`; `--clients` concurrent clients send requests
back to back for `--minutes`, about a third of them bad (broken JSON, missing or wrong-typed
fields, an unknown model, max_tokens past the context, an over-long prompt, an oversized body).
It reports, and exits non-zero unless all hold:
- good requests failed: 0 (every good request answered 200 with a completion);
- bad requests answered 5xx: 0 (every bad one a 4xx);
- replica restarts: 0 (the replica process at the end is the one at the start);
- memory flat: the replica's resident memory (with its vLLM engine process), sampled every
  5 s, grows by less than `--rss-growth-mib` over the second half of the run. The first half
  is reported too: allocator pools and caches fill early under a new load, a leak keeps going.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any

APP, MODEL = "soak", "soak-model"
ENGINE = {"max_model_len": 256, "cpus_per_engine": 1, "kv_cache_gib": 1}


def good_request(rng: random.Random, max_tokens: int) -> dict[str, Any]:
    words = " ".join(rng.choice(["tell", "me", "about", "camels", "and", "rain"])
                     for _ in range(rng.randint(1, 12)))
    return {"model": MODEL, "messages": [{"role": "user", "content": words}],
            "max_tokens": rng.randint(1, max_tokens), "temperature": rng.choice([0.0, 0.7]),
            "seed": rng.randint(0, 1000), "stream": rng.random() < 0.25}


def bad_request(rng: random.Random) -> tuple[str, bytes]:
    """(what is wrong, body): each one a request the API must refuse with a 4xx."""
    ok = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    kinds = {
        "broken_json": b'{"model": "soak-model", "messages": [',
        "not_an_object": b"[1, 2, 3]",
        "no_messages": json.dumps({"model": MODEL}).encode(),
        "empty_messages": json.dumps({**ok, "messages": []}).encode(),
        "unknown_model": json.dumps({**ok, "model": "gpt-9"}).encode(),
        "bad_role": json.dumps({**ok, "messages": [{"role": "robot", "content": "x"}]}).encode(),
        "temperature_type": json.dumps({**ok, "temperature": "hot"}).encode(),
        "max_tokens_past_context": json.dumps({**ok, "max_tokens": 4000}).encode(),
        "seed_past_64_bits": json.dumps({**ok, "seed": 2**64, "temperature": 1.0}).encode(),
        "prompt_too_long": json.dumps({**ok, "messages": [
            {"role": "user", "content": "camel " * 400}]}).encode(),
        "body_too_large": b'{"pad": "' + b"x" * 1_100_000 + b'"}',
    }
    kind = rng.choice(sorted(kinds))
    return kind, kinds[kind]


@dataclass
class Tally:
    good: int = 0
    good_failed: int = 0
    bad: int = 0
    bad_5xx: int = 0
    tokens: int = 0
    latencies: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # the first few, for the report


async def send_good(client: Any, url: str, body: dict[str, Any], tally: Tally) -> None:
    start = time.perf_counter()
    try:
        if body["stream"]:
            done = False
            async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
                ok = resp.status_code == 200
                async for line in resp.aiter_lines():
                    done = done or line == "data: [DONE]"
            ok = ok and done
        else:
            resp = await client.post(f"{url}/v1/chat/completions", json=body)
            ok = resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] >= 1
            tally.tokens += resp.json()["usage"]["completion_tokens"] if ok else 0
        reason = "" if ok else f"status {resp.status_code}"
    except Exception as err:  # noqa: BLE001 - any transport error is a failed good request
        ok, reason = False, f"{type(err).__name__}: {err}"
    tally.good += 1
    tally.latencies.append(time.perf_counter() - start)
    if not ok:
        tally.good_failed += 1
        if len(tally.failures) < 5:
            tally.failures.append(f"good request failed: {reason}")


async def send_bad(client: Any, url: str, kind: str, body: bytes, tally: Tally) -> None:
    try:
        resp = await client.post(f"{url}/v1/chat/completions", content=body,
                                 headers={"content-type": "application/json"})
        status, text = resp.status_code, resp.text[:200]
    except Exception as err:  # noqa: BLE001 - a dropped connection is no 4xx either
        status, text = 0, f"{type(err).__name__}: {err}"
    tally.bad += 1
    if not 400 <= status < 500:
        tally.bad_5xx += 1
        if len(tally.failures) < 5:
            tally.failures.append(f"bad request {kind} -> {status}: {text}")


async def client_loop(client: Any, url: str, seed: int, deadline: float, tally: Tally,
                      bad_fraction: float, max_tokens: int) -> None:
    rng = random.Random(seed)
    while time.monotonic() < deadline:
        if rng.random() < bad_fraction:
            await send_bad(client, url, *bad_request(rng), tally)
        else:
            await send_good(client, url, good_request(rng, max_tokens), tally)


def replica_processes() -> list[Any]:
    """The replica (Ray titles it `ray::ServeReplica:<app>:ChatServer`) of our own local Ray
    cluster: among this process's descendants (its raylet starts the workers), so that a soak
    elsewhere on the machine, with a replica of the same name, is not taken for ours."""
    import psutil

    ours = psutil.Process().children(recursive=True)
    return [p for p in ours
            if any(f"ServeReplica:{APP}:ChatServer" in c for c in _cmdline(p))]


def _cmdline(proc: Any) -> list[str]:
    import psutil

    try:
        return proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return []


def replica_identity() -> tuple[int, float]:
    (proc,) = replica_processes()
    return proc.pid, proc.create_time()


def replica_rss_mib() -> float:
    total = 0
    for proc in replica_processes():
        for p in [proc, *proc.children(recursive=True)]:
            total += p.memory_info().rss
    return total / 2**20


async def sample_memory(deadline: float, samples: list[tuple[float, float]]) -> None:
    start = time.monotonic()
    while time.monotonic() < deadline:
        samples.append((time.monotonic() - start, replica_rss_mib()))
        await asyncio.sleep(5)
    samples.append((time.monotonic() - start, replica_rss_mib()))


async def soak(url: str, seconds: float, clients: int, bad_fraction: float = 0.35,
               max_tokens: int = 16, warmup_s: float = 20.0, seed: int = 0) -> dict[str, Any]:
    """Run the load for `seconds`; the figures of the report (see the module docstring)."""
    import httpx

    identity = replica_identity()
    tally, samples = Tally(), []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        warm = time.monotonic() + warmup_s  # first requests size vLLM's buffers: not a leak
        await asyncio.gather(*(client_loop(client, url, seed + i, warm, Tally(), bad_fraction,
                                           max_tokens) for i in range(clients)))
        deadline = time.monotonic() + seconds
        started = time.monotonic()
        await asyncio.gather(
            sample_memory(deadline, samples),
            *(client_loop(client, url, seed + 1000 + i, deadline, tally, bad_fraction,
                          max_tokens) for i in range(clients)))
        elapsed = time.monotonic() - started
    restarts = 0 if replica_identity() == identity else 1
    rss = [m for _, m in samples]
    lat = sorted(tally.latencies) or [0.0]
    return {
        "seconds": round(elapsed, 1), "clients": clients,
        "good_requests": tally.good, "good_failed": tally.good_failed,
        "bad_requests": tally.bad, "bad_answered_5xx": tally.bad_5xx,
        "requests_per_second": round((tally.good + tally.bad) / elapsed, 2),
        "good_p50_s": round(statistics.median(lat), 3),
        "good_p99_s": round(lat[int(0.99 * (len(lat) - 1))], 3),
        "replica_restarts": restarts,
        "rss_start_mib": round(rss[0], 1), "rss_mid_mib": round(rss[len(rss) // 2], 1),
        "rss_end_mib": round(rss[-1], 1), "rss_max_mib": round(max(rss), 1),
        "rss_samples": [(round(t), round(m)) for t, m in samples],
        "failures": tally.failures,
    }


def start_server(model_path: str) -> str:

    from dromedary_ray.config import RayConfig
    from dromedary_ray.runtime.cluster import connect
    from dromedary_ray.serve.app import build_app, deploy

    connect(RayConfig())
    return deploy(build_app({"model": model_path, "served_model_name": MODEL, "engine": ENGINE,
                             "default_max_tokens": 16}), APP)


def verdict(out: dict[str, Any], rss_growth_mib: float) -> list[str]:
    """What failed, in words; empty when the soak passed."""
    problems = []
    if out["good_failed"]:
        problems.append(f"{out['good_failed']} good requests failed")
    if out["bad_answered_5xx"]:
        problems.append(f"{out['bad_answered_5xx']} bad requests got a non-4xx answer")
    if out["replica_restarts"]:
        problems.append("the replica was restarted")
    growth = out["rss_end_mib"] - out["rss_mid_mib"]
    if growth >= rss_growth_mib:
        problems.append(f"replica memory grew {growth:.0f} MiB over the second half of the run "
                        f"(limit {rss_growth_mib:.0f})")
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="builtin:tiny-llama")
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--rss-growth-mib", type=float, default=64.0)
    ap.add_argument("--bad-fraction", type=float, default=0.35,
                    help="share of bad requests (0: good ones only, to tell a leak in the "
                         "error paths from one in the answering path)")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    from ray import serve

    from dromedary_ray.models import resolve_model

    url = start_server(resolve_model(args.model))
    try:
        out = asyncio.run(soak(url, args.minutes * 60, args.clients, args.bad_fraction))
    finally:
        serve.shutdown()
    problems = verdict(out, args.rss_growth_mib)
    out["verdict"] = problems or "passed"
    print(json.dumps(out, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
