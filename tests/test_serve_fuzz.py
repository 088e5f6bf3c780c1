"""The Serve API fuzzed from its own OpenAPI description (schemathesis): no input gives a 5xx.

A real Ray Serve deployment of the tiny model on 127.0.0.1; schemathesis reads `/openapi.json`
and generates requests that fit the described schema (positive) and that break it (negative:
wrong types, missing fields, out-of-range numbers). Every answer must be a 2xx or a 4xx, and the
replica must stay the same one throughout (a crash would be restarted by Serve, unseen by HTTP).
Every streamed answer must end properly: each event is JSON, the last is [DONE].
"""

import json
import os

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

pytestmark = pytest.mark.slow

KEY, MODEL = "fuzz-key", "tiny"
EXAMPLES = 120  # per operation; the chat route is the one that matters
SEEN: dict[str, int] = {}  # status code class -> count, for the report at the end


@pytest.fixture(scope="module")
def fuzz_server(ray_local, tiny_model):
    import httpx
    from ray import serve

    from dromedary_ray.serve.app import build_app, deploy

    os.environ["DROMEDARY_FUZZ_KEY"] = KEY
    # A short context keeps every accepted request quick: max_tokens must stay below 128.
    app = build_app({"model": tiny_model, "served_model_name": MODEL, "default_max_tokens": 8,
                     "api_key_env": "DROMEDARY_FUZZ_KEY",
                     "engine": {"max_model_len": 128, "cpus_per_engine": 1, "kv_cache_gib": 1}})
    url = deploy(app, "fuzz")
    assert httpx.get(f"{url}/health", timeout=120).json() == {"status": "ok"}
    try:
        pid = replica_pid(url)
        yield url
        assert replica_pid(url) == pid, "the replica was restarted during the fuzz run"
    finally:
        print(f"\nfuzz answers by status class: {dict(sorted(SEEN.items()))}")
        serve.shutdown()


def replica_pid(url: str) -> int:
    """The process id of the one live replica (Ray titles it `ray::ServeReplica:<app>:<cls>`):
    a replica that crashed and was restarted by Serve has another."""
    import psutil
    from ray import serve

    status = serve.status().applications["fuzz"].deployments["ChatServer"]
    assert status.status == "HEALTHY", status
    pids = [p.pid for p in psutil.process_iter(["cmdline"])
            if any("ServeReplica:fuzz:ChatServer" in c for c in p.info["cmdline"] or [])]
    assert len(pids) == 1, pids
    return pids[0]


def check(case, url: str) -> None:
    # Most generated model names are unknown (a 404 before the engine); name ours in the
    # bodies that have a string there, so that generation itself is fuzzed too.
    if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
        case.body["model"] = MODEL
    response = case.call(base_url=url, headers={"Authorization": f"Bearer {KEY}"},
                         timeout=120)
    kind = f"{response.status_code // 100}xx"
    SEEN[kind] = SEEN.get(kind, 0) + 1
    assert response.status_code < 500, (
        f"{case.method} {case.path} -> {response.status_code}: {response.text[:500]}\n"
        f"body: {case.body!r}")
    check_stream(response, case)


def check_stream(response, case) -> None:
    """A server-sent event stream that ends early or with a broken event looks, to a client, like
    a short answer; every one must end with [DONE], each event before it a JSON object."""
    if not any("text/event-stream" in v for v in response.headers.get("content-type", [])):
        return
    SEEN["streams"] = SEEN.get("streams", 0) + 1
    assert not response.stream_cut_short, "raise max-stream-events: the stream was cut short"
    text = response.content.decode()
    assert text.endswith("\n\n"), (text[-300:], case.body)
    events = [e.removeprefix("data: ") for e in text.split("\n\n")[:-1]]
    assert events and events[-1] == "[DONE]", (events[-3:], case.body)
    for event in events[:-1]:
        body = json.loads(event)
        assert isinstance(body, dict) and "error" not in body, (event, case.body)


def test_no_input_gets_a_server_error(fuzz_server):
    """Every operation of /openapi.json, with bodies that fit the schema and bodies that break
    it. (schemathesis's own pytest loader fails under pytest 9, so we drive its strategies
    with hypothesis directly.)"""
    from schemathesis.config import SchemathesisConfig

    # schemathesis reads 20 events of a stream by default; ours run to max_tokens (< 128) + 2.
    config = SchemathesisConfig.from_dict({"max-stream-events": 1000})
    schema = schemathesis.openapi.from_url(f"{fuzz_server}/openapi.json", config=config)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {(op.method.upper(), op.path) for op in operations} >= {
        ("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("GET", "/health")}
    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            examples = EXAMPLES if op.path == "/v1/chat/completions" else 10

            @given(case=op.as_strategy(generation_mode=mode))
            @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            def fuzz(case):
                check(case, fuzz_server)

            try:
                fuzz()
            except Unsatisfiable:
                # A route with no inputs (GET /health) has nothing to break.
                assert mode == GenerationMode.NEGATIVE and op.path != "/v1/chat/completions"
    assert SEEN.get("2xx", 0) >= 10 and SEEN.get("4xx", 0) >= 50, SEEN
    assert SEEN.get("streams", 0) >= 3, SEEN  # the positive cases do stream, and were checked
