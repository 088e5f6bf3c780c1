"""The Serve app's limits and recovery against a real replica of the tiny model on 127.0.0.1:
a chunked body past the limit, a generation past its deadline, a full queue, a second Serve
start with other HTTP options, and a replica whose vLLM engine-core process is killed.

One deployment for the module, with tight limits so that each path is reached in seconds:
one request at a time, one waiting, a 2 s deadline, health checks every second. The engine
kill is the last test: it replaces the replica.
"""

import asyncio
import json
import os
import re
import signal
import time

import pytest

pytestmark = pytest.mark.slow

KEY, MODEL, APP = "recovery-key", "tiny", "recovery"
TIMEOUT_S = 2.0
HEADERS = {"Authorization": f"Bearer {KEY}"}
SHORT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
# Random weights never stop early: 2,000 tokens take far longer than the 2 s deadline here.
LONG = {**SHORT, "max_tokens": 2000}


@pytest.fixture(scope="module")
def server(ray_local, tiny_model):
    import httpx
    from ray import serve

    from dromedary_ray.serve.app import build_app, deploy

    os.environ["DROMEDARY_RECOVERY_KEY"] = KEY
    app = build_app({"model": tiny_model, "served_model_name": MODEL,
                     "api_key_env": "DROMEDARY_RECOVERY_KEY", "request_timeout_s": TIMEOUT_S,
                     "max_ongoing_requests": 1, "max_queued_requests": 1,
                     "health_check_period_s": 1,
                     "engine": {"max_model_len": 2048, "cpus_per_engine": 1, "kv_cache_gib": 1}})
    url = deploy(app, APP)
    assert httpx.get(f"{url}/health", timeout=120).json() == {"status": "ok"}
    yield url
    serve.shutdown()


def post(url, payload, **kw):
    import httpx

    return httpx.post(f"{url}/v1/chat/completions", json=payload, headers=HEADERS,
                      timeout=120, **kw)


def replica_pid() -> int:
    import psutil

    pids = [p.pid for p in psutil.process_iter(["cmdline"])
            if any(f"ServeReplica:{APP}:ChatServer" in c for c in p.info["cmdline"] or [])]
    assert len(pids) == 1, pids
    return pids[0]


def chunked_upload(url: str, chunks: int) -> tuple[int, int, dict]:
    """POST a chunked body (no Content-Length) of `chunks` 64 KiB chunks over a raw socket,
    watching for the answer after each chunk; returns (chunks sent before the answer came,
    its status, its JSON body). Over HTTP clients the answer only shows once the upload ends
    (the proxy drains the rest), so they cannot tell whether the server stopped reading."""
    import select
    import socket
    from urllib.parse import urlsplit

    where = urlsplit(url)
    sock = socket.create_connection((where.hostname, where.port), timeout=60)
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {where.netloc}\r\n"
            f"Authorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n\r\n")
    first = b'{"model": "tiny", "messages": [{"role": "user", "content": "'
    sock.sendall(head.encode() + b"%x\r\n%s\r\n" % (len(first), first))
    sent, answer = 0, b""
    while sent < chunks and not select.select([sock], [], [], 0.01)[0]:
        sock.sendall(b"10000\r\n" + b"x" * 65536 + b"\r\n")
        sent += 1
    if sent == chunks:  # never answered mid-upload: finish the body and take the answer
        sock.sendall(b'4\r\n"}]}\r\n0\r\n\r\n')
    while not _complete(answer):
        data = sock.recv(65536)
        assert data, f"the connection closed mid-answer: {answer[:300]!r}"
        answer += data
    sock.close()
    status_line, _, rest = answer.partition(b"\r\n")
    return sent, int(status_line.split()[1]), json.loads(rest.partition(b"\r\n\r\n")[2])


def _complete(answer: bytes) -> bool:
    head, sep, body = answer.partition(b"\r\n\r\n")
    length = re.search(rb"content-length: *(\d+)", head, re.I)
    return bool(sep) and length is not None and len(body) >= int(length.group(1))


def test_a_chunked_body_past_the_limit_is_refused_without_reading_it_all(server):
    """No Content-Length: the replica reads the stream and stops at the 1 MB limit, answering
    413 with our error object while the client is still sending (it once read all of it)."""
    sent, status, body = chunked_upload(server, 400)  # 25 MiB offered; the limit is 1 MB
    assert status == 413 and body["error"]["code"] == "body_too_large", (status, body)
    assert sent < 400, "the answer came only after the whole body was sent"
    assert post(server, SHORT).status_code == 200


def test_a_generation_past_its_deadline_is_a_504_and_frees_the_engine(server):
    start = time.monotonic()
    resp = post(server, LONG)
    assert resp.status_code == 504, resp.text[:300]
    assert resp.json()["error"]["code"] == "timeout" and time.monotonic() - start < 30
    # The request was aborted in the engine: the next one is answered at once, not after it.
    resp = post(server, SHORT)
    assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 2


def test_a_stream_past_its_deadline_ends_with_an_error_event_then_done(server):
    import httpx

    with httpx.stream("POST", f"{server}/v1/chat/completions", json={**LONG, "stream": True},
                      headers=HEADERS, timeout=120) as resp:
        assert resp.status_code == 200
        events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    parsed = [json.loads(e) for e in events[:-1]]
    assert parsed[-1]["error"]["code"] == "timeout", parsed[-1]
    assert all("choices" in p for p in parsed[:-1]) and len(parsed) > 2
    assert post(server, SHORT).status_code == 200


def test_past_the_queue_limit_serve_answers_503(server):
    """One running, one waiting; the rest are turned away at once instead of queueing."""
    import httpx

    async def one(client):
        resp = await client.post(f"{server}/v1/chat/completions", json=LONG, headers=HEADERS)
        return resp.status_code, resp.headers.get("retry-after")

    async def burst():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(one(client) for _ in range(6)))

    answers = asyncio.run(burst())
    codes = sorted(code for code, _ in answers)
    assert set(codes) <= {503, 504} and codes.count(503) >= 3, answers
    assert all(retry == "1" for code, retry in answers if code == 503), answers
    assert post(server, SHORT).status_code == 200


def test_a_second_serve_start_with_other_http_options_is_refused(server):
    """Ray would ignore the new options and serve on the running proxies; deploy says so."""
    from urllib.parse import urlsplit

    from ray import serve

    from dromedary_ray.errors import ConfigError
    from dromedary_ray.serve.app import deploy

    @serve.deployment
    class Other:
        def __call__(self, request) -> str:
            return "other"

    port = urlsplit(server).port
    for host, other_port in (("0.0.0.0", port), ("127.0.0.1", port + 1)):
        with pytest.raises(ConfigError, match=f"127.0.0.1:{port}"):
            deploy(Other.bind(), "other", host, other_port)
    assert set(serve.status().applications) == {APP}


def test_a_replica_whose_engine_died_is_replaced(server):
    """SIGKILL the replica's vLLM engine-core process: requests get a 503 naming the cause
    (not a bare 500), check_health fails, Serve replaces the replica, and it serves again."""
    import psutil

    old = replica_pid()
    cores = [p for p in psutil.Process(old).children(recursive=True)
             if "EngineCore" in p.name() or any("EngineCore" in c for c in p.cmdline())]
    assert cores, [(p.pid, p.name()) for p in psutil.Process(old).children(recursive=True)]
    for core in cores:
        os.kill(core.pid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while (resp := post(server, SHORT)).status_code == 200 and time.monotonic() < deadline:
        time.sleep(0.5)
    if resp.status_code != 503:  # the proxy may already see the replica as going away
        assert resp.status_code >= 500
    else:
        assert resp.json()["error"]["code"] == "engine_dead", resp.text
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        try:
            if post(server, SHORT).status_code == 200 and replica_pid() != old:
                break
        except Exception:  # the replica is being replaced: 503s, refused connections
            pass
        time.sleep(2)
    else:
        pytest.fail("the replica with the dead engine was never replaced")
    assert post(server, SHORT).json()["usage"]["completion_tokens"] == 2


def test_vllm_itself_runs_no_model_code(tmp_path):
    """Our pre-check aside (tests/test_serve_limits.py), the replica's engine loads with
    trust_remote_code=False: pointed at a folder whose architecture exists only as code in
    it, it refuses, and the code is never imported. (In a child process: start_engine sets
    vLLM's environment variables in the process that calls it.)"""
    import subprocess
    import sys

    from test_serve_limits import remote_code_model

    folder, marker = remote_code_model(tmp_path)
    code = ("import sys\n"
            "from dromedary_ray.config import EngineConfig\n"
            "from dromedary_ray.serve.engine import start_engine\n"
            "start_engine(sys.argv[1], EngineConfig(max_model_len=128, cpus_per_engine=1, "
            "kv_cache_gib=1))\n")
    done = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode != 0, done.stdout[-2000:]
    assert "trust_remote_code" in done.stderr, done.stderr[-3000:]
    assert not marker.exists()
