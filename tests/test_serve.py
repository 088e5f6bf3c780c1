"""Ray Serve over HTTP on 127.0.0.1: a real client against the real app on the tiny model."""

import asyncio
import json
import os

import pytest

pytestmark = pytest.mark.slow

KEY = "test-key-123"
MODEL = "tiny"


@pytest.fixture(scope="module")
def server(ray_local, tiny_model):
    import httpx
    from ray import serve

    from dromedary_ray.serve.app import build_app, deploy

    os.environ["DROMEDARY_TEST_KEY"] = KEY
    app = build_app({"model": tiny_model, "served_model_name": MODEL, "api_key_env":
                     "DROMEDARY_TEST_KEY", "default_max_tokens": 16,
                     "engine": {"max_model_len": 512, "cpus_per_engine": 1, "kv_cache_gib": 1}})
    url = deploy(app, "dromedary")
    assert httpx.get(f"{url}/health", timeout=60).json() == {"status": "ok"}
    yield url
    serve.shutdown()


def post(url, payload, key=KEY, **kw):
    import httpx

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{url}/v1/chat/completions", headers=headers, timeout=120, **kw,
                      **({"json": payload} if payload is not None else {}))


GOOD = {"model": MODEL, "messages": [{"role": "user", "content": "Hello there"}],
        "max_tokens": 12, "temperature": 1.0, "seed": 7}


def test_models_and_auth(server):
    import httpx

    listing = httpx.get(f"{server}/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert listing["data"][0]["id"] == MODEL
    for key in (None, "wrong"):
        resp = post(server, GOOD, key=key)
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key"


def test_answers_a_chat_request(server):
    resp = post(server, GOOD)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["object"] == "chat.completion" and body["model"] == MODEL
    assert body["usage"]["completion_tokens"] == 12  # random weights never stop early
    assert isinstance(body["choices"][0]["message"]["content"], str)
    assert body["choices"][0]["finish_reason"] == "length"
    assert resp.headers["server-timing"].startswith("engine;dur=")


def test_streams_tokens(server):
    import httpx

    chunks = []
    with httpx.stream("POST", f"{server}/v1/chat/completions", json={**GOOD, "stream": True},
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in resp.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert len(chunks) >= 4 and chunks[-1]["choices"][0]["finish_reason"] == "length"
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    # Same seed, same prompt: the stream spells out exactly the non-streamed answer.
    assert streamed == post(server, GOOD).json()["choices"][0]["message"]["content"]


BAD = [
    ("malformed json", b"{oops", 400, None),
    ("missing messages", {"model": MODEL}, 400, "messages"),
    ("wrong type", {**GOOD, "messages": "hi"}, 400, "messages"),
    ("unknown model", {**GOOD, "model": "gpt-9"}, 404, "model"),
    ("empty messages", {**GOOD, "messages": []}, 400, "messages"),
    ("bad role", {**GOOD, "messages": [{"role": "x", "content": "y"}]}, 400, "messages.0.role"),
    ("max_tokens zero", {**GOOD, "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens huge", {**GOOD, "max_tokens": 10**6}, 400, "max_tokens"),
    ("over-long prompt", {**GOOD, "messages": [{"role": "user", "content": "word " * 2000}]},
     400, "messages"),
    ("too-large body", {**GOOD, "messages": [{"role": "user", "content": "x" * 2_000_000}]},
     413, None),
]


def test_bad_requests_get_4xx_naming_the_field_and_change_nothing(server):
    before = post(server, GOOD).json()["choices"][0]["message"]["content"]
    for name, payload, status, param in BAD:
        if isinstance(payload, bytes):
            resp = post(server, None, content=payload)
        else:
            resp = post(server, payload)
        assert resp.status_code == status, (name, resp.text[:300])
        assert resp.json()["error"]["param"] == param, name
    after = post(server, GOOD).json()["choices"][0]["message"]["content"]
    assert after == before  # the replica survived and answers exactly as before


def test_32_concurrent_requests_all_answered(server):
    import httpx

    async def one(client, i):
        resp = await client.post(f"{server}/v1/chat/completions",
                                 json={**GOOD, "seed": i, "max_tokens": 8},
                                 headers={"Authorization": f"Bearer {KEY}"})
        return resp.status_code, resp.json()["usage"]["completion_tokens"]

    async def all_of_them():
        async with httpx.AsyncClient(timeout=300) as client:
            return await asyncio.gather(*(one(client, i) for i in range(32)))

    results = asyncio.run(all_of_them())
    assert results == [(200, 8)] * 32


def test_access_log_lines_reach_the_replica_log_file(server):
    """Each answered request's access-log line is written to the replica's Serve log file. vLLM
    once closed Serve's log handler when the replica imported it; the lines then piled up in the
    replica's memory, unwritten, for as long as it served (the soak's memory growth)."""
    import time
    from pathlib import Path

    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"

    def written() -> int:
        return sum(f.read_text().count("POST /v1/chat/completions 200")
                   for f in logs.glob("replica_dromedary_ChatServer_*.log"))

    before = written()
    for seed in range(3):
        assert post(server, {**GOOD, "seed": seed, "max_tokens": 2}).status_code == 200
    deadline = time.monotonic() + 30
    while written() < before + 3 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert written() >= before + 3, sorted(p.name for p in logs.iterdir())


def test_terminal_chat_against_the_server(server):
    import io

    from dromedary_ray.serve.chat import chat_loop, http_replier

    out = io.StringIO()
    transcript = chat_loop(http_replier(server, None, KEY, 8), io.StringIO("hi\n"), out)
    assert transcript[0] == {"role": "user", "content": "hi"}
    assert transcript[1]["role"] == "assistant" and transcript[1]["content"]
    assert transcript[1]["content"] in out.getvalue()
