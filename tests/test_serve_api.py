"""Request validation for the chat API: every bad request is a 4xx naming its field."""

import io
import json

import pytest

from dromedary_ray.serve.api import (
    ApiError,
    Limits,
    check_auth,
    check_prompt_length,
    key_digest,
    parse_chat_request,
)
from dromedary_ray.serve.chat import chat_loop

LIMITS = Limits(served_model="m", max_model_len=512, max_body_bytes=10_000)
GOOD = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def body(**changes) -> bytes:
    data = {**GOOD, **changes}
    return json.dumps({k: v for k, v in data.items() if v is not ...}).encode()


def test_good_request_parses_with_defaults():
    req = parse_chat_request(body(stop="END", max_tokens=8), LIMITS)
    assert req.messages[0].content == "hi" and req.stop == ["END"] and req.max_tokens == 8
    assert req.stream is False and req.temperature == 0.7


@pytest.mark.parametrize(
    "raw, status, param, code",
    [
        (b"{not json", 400, None, "invalid_json"),
        (b"[1, 2]", 400, None, "invalid_json"),
        (b"\xff\xfe", 400, None, "invalid_json"),
        (body(model=...), 400, "model", "invalid_request_error"),
        (body(messages=...), 400, "messages", "invalid_request_error"),
        (body(messages=[]), 400, "messages", "invalid_request_error"),
        (body(messages="hello"), 400, "messages", "invalid_request_error"),
        (body(messages=[{"role": "robot", "content": "x"}]), 400, "messages.0.role",
         "invalid_request_error"),
        (body(messages=[{"role": "user", "content": 5}]), 400, "messages.0.content",
         "invalid_request_error"),
        (body(model="other"), 404, "model", "model_not_found"),
        (body(max_tokens=0), 400, "max_tokens", "invalid_request_error"),
        (body(max_tokens=100000), 400, "max_tokens", "invalid_request_error"),
        (body(max_tokens=512), 400, "max_tokens", "invalid_request_error"),
        (body(max_tokens="ten"), 400, "max_tokens", "invalid_request_error"),
        (body(temperature=5), 400, "temperature", "invalid_request_error"),
        (body(top_p=0), 400, "top_p", "invalid_request_error"),
        (body(n=3), 400, "n", "invalid_request_error"),
        (body(stream="yes please"), 400, "stream", "invalid_request_error"),
        (body(stop=["a", "b", "c", "d", "e"]), 400, "stop", "invalid_request_error"),
        (b"{" + b" " * 20_000 + b"}", 413, None, "body_too_large"),
    ],
)
def test_bad_requests_name_the_field(raw, status, param, code):
    with pytest.raises(ApiError) as err:
        parse_chat_request(raw, LIMITS)
    assert (err.value.status, err.value.param, err.value.code) == (status, param, code)
    payload = err.value.body()["error"]
    assert payload["param"] == param and payload["message"]
    if param:
        assert param.split(".")[0] in payload["message"]


def test_over_long_prompt():
    check_prompt_length(400, 100, LIMITS)
    with pytest.raises(ApiError) as err:
        check_prompt_length(450, 100, LIMITS)
    assert err.value.param == "messages" and err.value.code == "context_length_exceeded"


def test_auth_compares_digests():
    digest = key_digest("s3cret")
    assert digest != "s3cret" and len(digest) == 64
    check_auth("Bearer s3cret", digest)
    check_auth(None, None)  # no key configured: open (loopback demos)
    for header in (None, "Bearer wrong", "s3cret", "Basic s3cret", "Bearer "):
        with pytest.raises(ApiError) as err:
            check_auth(header, digest)
        assert err.value.status == 401


def test_chat_loop_keeps_history_and_resets():
    seen = []

    def reply(messages):
        seen.append([m["content"] for m in messages])
        yield "ans"
        yield "wer"

    out = io.StringIO()
    transcript = chat_loop(reply, io.StringIO("one\ntwo\n/reset\nthree\n"), out, system="sys")
    assert seen == [["sys", "one"], ["sys", "one", "answer", "two"], ["sys", "three"]]
    assert transcript[-1] == {"role": "assistant", "content": "answer"}
    assert out.getvalue().count("model> answer") == 3


def test_openapi_describes_the_chat_body():
    """The route reads its raw body, so FastAPI alone would describe none; clients and the
    schemathesis fuzz (tests/test_serve_fuzz.py) need the schema, with no dangling refs."""
    import json

    from dromedary_ray.serve.app import fastapi_app

    doc = fastapi_app.openapi()
    body = doc["paths"]["/v1/chat/completions"]["post"]["requestBody"]
    schema = body["content"]["application/json"]["schema"]
    assert body["required"] and schema["required"] == ["model", "messages"]
    message = schema["properties"]["messages"]["items"]
    assert message["properties"]["role"]["enum"] == ["system", "user", "assistant"]
    assert "$ref" not in json.dumps(schema)


def test_seed_outside_64_bits_is_a_400_naming_it():
    """vLLM seeds a torch.Generator; a seed past 64 bits raised inside its engine process."""
    limits = Limits("tiny", 512)
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    for seed in (2**64, -(2**63) - 1):
        with pytest.raises(ApiError) as err:
            parse_chat_request(json.dumps({**body, "seed": seed}).encode(), limits)
        assert err.value.status == 400 and err.value.param == "seed"
    assert parse_chat_request(json.dumps({**body, "seed": 2**63 - 1}).encode(), limits).seed
