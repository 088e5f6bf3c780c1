"""The Serve app's limits and failure paths, without Ray or vLLM: a fake engine stands in for
AsyncLLM, so timeouts, engine failures and broken streams are exact and take milliseconds.
tests/test_serve_recovery.py checks the same paths against a real replica."""

import asyncio
import json
import sys
import types
from types import SimpleNamespace

import pytest

from dromedary_ray.errors import ConfigError
from dromedary_ray.serve.api import MAX_STOP_CHARS, ApiError, Limits, parse_chat_request, read_body
from dromedary_ray.serve.engine import bounded_outputs, encode_chat, engine_error

LIMITS = Limits(served_model="m", max_model_len=512)


def out(text: str, finished: bool = False):
    return SimpleNamespace(finished=finished, outputs=[SimpleNamespace(
        text=text, token_ids=[1] * len(text), finish_reason="length" if finished else None)])


class EngineDeadError(Exception):
    """Named as vLLM's: engine_error matches vLLM's classes by name."""


class FakeEngine:
    """AsyncLLM's surface as the app uses it: generate, abort, check_health, errored."""

    def __init__(self, texts=("a", "b", "c"), delay=0.0, fail_at=None, errored=False):
        self.texts, self.delay, self.fail_at, self.errored = texts, delay, fail_at, errored
        self.aborted: list[str] = []
        self.generated = self.closed = 0

    @property
    def dead_error(self):
        return EngineDeadError("core died")

    async def generate(self, prompt, params, req_id):
        self.generated += 1
        try:
            for i, text in enumerate(self.texts):
                await asyncio.sleep(self.delay)
                if i == self.fail_at:
                    raise RuntimeError("the engine broke")
                yield out(text, finished=i == len(self.texts) - 1)
        finally:
            self.closed += 1

    async def abort(self, req_id):
        self.aborted.append(req_id)

    async def check_health(self):
        if self.errored:
            raise self.dead_error


async def collect(engine, timeout_s=5.0):
    return [o.outputs[0].text async for o in bounded_outputs(engine, None, None, "r1", timeout_s)]


def api_error(coro) -> ApiError:
    with pytest.raises(ApiError) as err:
        asyncio.run(coro)
    return err.value


# --- the body limit, whatever the framing -------------------------------------------------------


def test_a_body_without_length_is_read_only_up_to_the_limit():
    """A chunked upload has no Content-Length; the route reads the stream and stops at the
    limit. The stream here never ends: reading it all would never return."""
    pulled = 0

    async def endless():
        nonlocal pulled
        while True:
            pulled += 1
            yield b"x" * 1000

    err = api_error(read_body(endless(), 10_000))
    assert (err.status, err.code) == (413, "body_too_large") and pulled == 11
    assert err.body()["error"]["type"] == "invalid_request_error"


def test_a_body_within_the_limit_is_read_whole():
    async def parts():
        for p in (b'{"a":', b" 1", b"}"):
            yield p

    assert asyncio.run(read_body(parts(), 100)) == b'{"a": 1}'


# --- stop strings ----------------------------------------------------------------------------


def test_stop_strings_are_bounded_in_length():
    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    ok = parse_chat_request(json.dumps({**base, "stop": ["x" * MAX_STOP_CHARS]}).encode(), LIMITS)
    assert ok.stop == ["x" * MAX_STOP_CHARS]
    for stop in ("x" * (MAX_STOP_CHARS + 1), ["ok", "y" * 10_000]):
        with pytest.raises(ApiError) as err:
            parse_chat_request(json.dumps({**base, "stop": stop}).encode(), LIMITS)
        assert (err.value.status, err.value.param) == (400, "stop")


# --- generation with a deadline --------------------------------------------------------------


def test_outputs_pass_through_within_the_deadline():
    engine = FakeEngine()
    assert asyncio.run(collect(engine)) == ["a", "b", "c"]
    assert engine.aborted == [] and engine.closed == 1


def test_a_generation_past_its_deadline_is_aborted_and_a_504():
    engine = FakeEngine(texts=("a",) * 100, delay=0.05)
    err = api_error(collect(engine, timeout_s=0.2))
    assert (err.status, err.code) == (504, "timeout") and engine.aborted == ["r1"]
    assert err.body()["error"]["type"] == "server_error" and "0.2 s" in err.message
    assert engine.closed == 1  # vLLM's generator saw the cancellation (it aborts there too)


def test_engine_failures_are_error_objects():
    err = api_error(collect(FakeEngine(fail_at=1)))
    assert (err.status, err.code) == (500, "engine_error") and "the engine broke" in err.message
    assert engine_error(EngineDeadError()).status == 503


def test_a_dead_engine_is_a_503_before_any_generation():
    engine = FakeEngine(errored=True)
    err = api_error(collect(engine))
    assert (err.status, err.code) == (503, "engine_dead") and engine.generated == 0


def test_a_consumer_that_stops_early_closes_the_generation():
    """A client that goes away closes the response's generator; vLLM's must close with it, as
    that is where vLLM aborts the request."""
    engine = FakeEngine(texts=("a",) * 100)

    async def first_only():
        gen = bounded_outputs(engine, None, None, "r1", 5.0)
        await anext(gen)
        await gen.aclose()

    asyncio.run(first_only())
    assert engine.closed == 1


# --- the chat template and sampling parameters -------------------------------------------------


def test_a_chat_template_that_raises_is_a_400_naming_messages():
    class Strict:
        chat_template = "{{ raise_exception('roles must alternate') }}"

        def apply_chat_template(self, messages, **kw):
            raise ValueError("Conversation roles must alternate user/assistant")

    with pytest.raises(ApiError) as err:
        encode_chat(Strict(), [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    assert (err.value.status, err.value.param) == (400, "messages")
    assert "alternate" in err.value.message


def test_sampling_parameters_vllm_refuses_are_a_400(monkeypatch):
    """vLLM itself stands in here by a module whose SamplingParams refuses (importing the real
    one costs ~10 s); the mapping, not vLLM's rules, is under test."""
    from dromedary_ray.serve.engine import sampling_params

    def refuse(**kw):
        raise ValueError("top_p must be in (0, 1], got 7")

    fake = types.ModuleType("vllm")
    fake.SamplingParams = refuse
    kinds = types.ModuleType("vllm.sampling_params")
    kinds.RequestOutputKind = SimpleNamespace(DELTA=1, FINAL_ONLY=2)
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", kinds)
    req = parse_chat_request(b'{"model": "m", "messages": [{"role": "user", "content": "x"}]}',
                             LIMITS)
    with pytest.raises(ApiError) as err:
        sampling_params(req, 8)
    assert err.value.status == 400 and "top_p must be" in err.value.message


# --- the replica: health and streams -----------------------------------------------------------


def server_class():
    from dromedary_ray.serve.app import ChatServer

    return ChatServer.func_or_class  # the class behind the Serve deployment


def test_check_health_fails_once_the_engine_has_died():
    """Serve calls check_health on each replica; without it a replica whose engine-core process
    died counted as healthy for ever."""
    cls = server_class()
    asyncio.run(cls.check_health(SimpleNamespace(engine=FakeEngine())))
    with pytest.raises(EngineDeadError):
        asyncio.run(cls.check_health(SimpleNamespace(engine=FakeEngine(errored=True))))


def stream_events(engine, timeout_s=5.0) -> list[str]:
    cls = server_class()
    replica = SimpleNamespace(limits=Limits("m", 512, request_timeout_s=timeout_s))
    replica._outputs = lambda ids, params, req_id: bounded_outputs(engine, None, params, req_id,
                                                                   timeout_s)

    async def run():
        return [e async for e in cls._stream(replica, [1, 2], None, "r1", 0)]

    events = "".join(asyncio.run(run()))
    assert events.endswith("\n\n")
    return [e.removeprefix("data: ") for e in events.split("\n\n")[:-1]]


def test_a_stream_that_fails_half_way_ends_with_an_error_event_then_done():
    events = stream_events(FakeEngine(fail_at=2))
    assert events[-1] == "[DONE]"
    parsed = [json.loads(e) for e in events[:-1]]
    assert [p["choices"][0]["delta"].get("content") for p in parsed[:-1]] == ["", "a", "b"]
    assert parsed[-1]["error"]["code"] == "engine_error" and "broke" in parsed[-1]["error"][
        "message"]


def test_a_stream_past_its_deadline_ends_with_a_timeout_event():
    engine = FakeEngine(texts=("a",) * 100, delay=0.05)
    events = stream_events(engine, timeout_s=0.2)
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "timeout"
    assert engine.aborted == ["r1"]


def test_a_good_stream_ends_with_done():
    events = stream_events(FakeEngine())
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"


# --- build_app fails closed; deploy refuses a Serve that runs elsewhere ------------------------


@pytest.mark.parametrize("value", [None, "", "  "])
def test_a_named_api_key_that_is_unset_or_empty_refuses_the_app(monkeypatch, value):
    from dromedary_ray.serve.app import build_app

    if value is None:
        monkeypatch.delenv("DROMEDARY_TEST_NO_KEY", raising=False)
    else:
        monkeypatch.setenv("DROMEDARY_TEST_NO_KEY", value)
    with pytest.raises(ConfigError, match="DROMEDARY_TEST_NO_KEY"):
        build_app({"model": "builtin:tiny-llama", "api_key_env": "DROMEDARY_TEST_NO_KEY"})


def test_request_timeout_must_be_positive():
    from dromedary_ray.serve.app import build_app

    with pytest.raises(ConfigError, match="request_timeout_s"):
        build_app({"model": "builtin:tiny-llama", "request_timeout_s": 0})


def test_running_serve_port_matches_or_refuses():
    from dromedary_ray.serve.app import running_serve_port

    assert running_serve_port("127.0.0.1", 8000, "127.0.0.1", 0) == 8000
    assert running_serve_port("127.0.0.1", 8000, "127.0.0.1", 8000) == 8000
    for host, port in (("0.0.0.0", 8000), ("127.0.0.1", 8001), ("localhost", 8000)):
        with pytest.raises(ConfigError, match="127.0.0.1:8000") as err:
            running_serve_port("127.0.0.1", 8000, host, port)
        assert "serve shutdown" in str(err.value)
    with pytest.raises(ConfigError, match="HTTP turned off"):
        running_serve_port(None, 8000, "127.0.0.1", 8000)


def test_deploy_onto_a_serve_with_other_http_options_is_refused(monkeypatch):
    """Ray ignores new HTTP options where Serve runs already (a log warning only), so the app
    would go onto proxies bound wherever the first caller chose."""
    import ray.serve.context
    from ray import serve

    from dromedary_ray.serve import app as app_module

    calls = []
    running = SimpleNamespace(http_config=SimpleNamespace(host="0.0.0.0", port=8000))
    monkeypatch.setattr(ray.serve.context, "_get_global_client", lambda **kw: running)
    monkeypatch.setattr(serve, "start", lambda **kw: calls.append(("start", kw)))
    monkeypatch.setattr(serve, "run", lambda *a, **kw: calls.append(("run", kw)))
    with pytest.raises(ConfigError, match="0.0.0.0:8000"):
        app_module.deploy(object(), "x", "127.0.0.1", 8000)
    assert calls == []
    running.http_config.host = "127.0.0.1"
    assert app_module.deploy(object(), "x", "127.0.0.1", 0) == "http://127.0.0.1:8000"
    assert [c[0] for c in calls] == ["run"]


# --- safe defaults: the CLI's checks before anything starts -------------------------------------


def serve_cli(*args: str, capsys) -> tuple[int, str]:
    from dromedary_ray.cli import main

    code = main(["serve", "builtin:tiny-llama", *args])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (("--host", "0.0.0.0"), "serving beyond loopback needs an API key"),
    (("--host", "192.168.1.20"), "serving beyond loopback needs an API key"),
    (("--host", "not-an-ip"), "--host 'not-an-ip': not an IP address"),
    (("--host", "example.com"), "not an IP address"),
    (("--api-key-env", "DROMEDARY_TEST_NO_KEY"), "DROMEDARY_TEST_NO_KEY is not set"),
    (("--port", "70000"), "--port 70000"),
    (("--request-timeout", "0"), "--request-timeout 0.0"),
])
def test_serve_refuses_unsafe_or_bad_options_with_exit_2(monkeypatch, capsys, args, message):
    monkeypatch.delenv("DROMEDARY_TEST_NO_KEY", raising=False)
    code, err = serve_cli(*args, capsys=capsys)
    assert code == 2 and err.startswith("error: ") and message in err, err
    assert "Traceback" not in err


# --- safe defaults: no model's own code runs ---------------------------------------------------


def remote_code_model(tmp_path):
    """A model folder whose architecture exists only as code in it: importing that code
    would leave a marker file."""
    folder, marker = tmp_path / "evil", tmp_path / "IMPORTED"
    folder.mkdir()
    code = f"open({str(marker)!r}, 'w').write('ran')\n"
    (folder / "evil_model.py").write_text(code)
    (folder / "tokenization_evil.py").write_text(code)
    (folder / "config.json").write_text(json.dumps({
        "model_type": "evil-llama", "architectures": ["EvilForCausalLM"],
        "auto_map": {"AutoConfig": "evil_model.EvilConfig",
                     "AutoModelForCausalLM": "evil_model.EvilForCausalLM",
                     "AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}}))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "auto_map": {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}}))
    return folder, marker


def test_a_model_that_needs_its_own_code_is_refused_and_its_code_never_runs(tmp_path):
    from dromedary_ray.serve.app import build_app

    folder, marker = remote_code_model(tmp_path)
    with pytest.raises(ConfigError, match="trust_remote_code=False") as err:
        build_app({"model": str(folder)})
    assert "evil-llama" in str(err.value) and not marker.exists()


def test_a_known_architecture_with_an_auto_map_is_not_refused(tmp_path):
    """Some hub models ship code for an architecture transformers now has; that code is never
    used (trust_remote_code=False), so the folder is fine."""
    from dromedary_ray.serve.engine import refuse_remote_code

    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "llama", "auto_map": {"AutoConfig": "x.Y"}}))
    refuse_remote_code(str(tmp_path))
