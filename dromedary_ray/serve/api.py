"""The OpenAI-style request schema and its validation. Pure: no Ray, no vLLM.

Every refusal is an `ApiError` with an HTTP status and the offending field, rendered as
OpenAI's error object: {"error": {"message", "type", "param", "code"}}. Validation happens
before a request reaches the engine, so a bad request can neither crash a replica nor change
what later requests get.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_BODY_BYTES = 1_000_000
MAX_TOKENS_LIMIT = 4096
# vLLM holds back the last (longest stop string - 1) characters of a stream until it knows no
# stop string starts there, and checks every stop string at every step: a long one stalls the
# stream and costs each step of the batch. 4 x 200 characters covers real stop sequences.
MAX_STOPS, MAX_STOP_CHARS = 4, 200
REQUEST_TIMEOUT_S = 300.0


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = ("authentication_error" if self.status == 401
                else "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param,
                          "code": self.code}}

    def event(self) -> str:
        """The end of a stream that failed after its 200 went out: the error object as one
        server-sent event, then [DONE], so a client sees why and knows the stream is over."""
        return f"data: {json.dumps(self.body())}\n\ndata: [DONE]\n\n"


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(BaseModel):
    """The subset of /v1/chat/completions we serve; unknown fields are ignored, as OpenAI does."""

    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float = Field(default=0.7, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False
    stop: str | list[str] | None = None
    # The engine seeds a torch.Generator, which takes 64-bit values only: a larger seed
    # raised inside vLLM's engine process, past all validation (a 500, not a 400).
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOPS or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"at most {MAX_STOPS} non-empty stop strings of at most "
                             f"{MAX_STOP_CHARS} characters each")
        return stops


@dataclass(frozen=True)
class Limits:
    served_model: str
    max_model_len: int
    default_max_tokens: int = 256
    max_body_bytes: int = MAX_BODY_BYTES
    request_timeout_s: float = REQUEST_TIMEOUT_S


def body_too_large(limit: int, size: int | None = None) -> ApiError:
    what = f"is {size} bytes" if size is not None else "goes on"
    return ApiError(413, f"request body {what}; the limit is {limit}", None, "body_too_large")


async def read_body(chunks: AsyncIterator[bytes], limit: int) -> bytes:
    """The request body from its chunks, refused as soon as it passes `limit` bytes.

    Content-Length alone does not bound a body: a chunked upload has none, so the route reads
    the stream itself and stops at the limit, whatever the framing.
    """
    parts, size = [], 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise body_too_large(limit)
        parts.append(chunk)
    return b"".join(parts)


def parse_chat_request(raw: bytes, limits: Limits) -> ChatRequest:
    """Bytes of a request body to a validated ChatRequest, or an ApiError naming the field."""
    if len(raw) > limits.max_body_bytes:
        raise body_too_large(limits.max_body_bytes, len(raw))
    try:
        data = json.loads(raw)
    # ValueError also covers a number over 4,300 digits; RecursionError, nesting too deep.
    except (ValueError, RecursionError) as err:
        what = f"request body is not valid JSON: {err}"
        raise ApiError(400, what, None, "invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object", None, "invalid_json")
    try:
        req = ChatRequest.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise ApiError(400, f"{param}: {first['msg']}", param) from None
    if req.model != limits.served_model:
        raise ApiError(404, f"model {req.model!r} is not served here; this server serves "
                            f"{limits.served_model!r}", "model", "model_not_found")
    if req.max_tokens is not None and req.max_tokens >= limits.max_model_len:
        raise ApiError(400, f"max_tokens: must be below the context length "
                            f"{limits.max_model_len}", "max_tokens")
    return req


def chat_openapi() -> dict[str, Any]:
    """The OpenAPI description of POST /v1/chat/completions's body and answers.

    The route reads the raw body itself (so that every bad body gets our 4xx, not FastAPI's
    422), which leaves FastAPI nothing to describe; this puts the schema back, so clients and
    fuzzers (tests/test_serve_fuzz.py) see what the route accepts.
    """
    schema = ChatRequest.model_json_schema()
    defs = schema.pop("$defs", {})
    error = {"description": "an OpenAI-style error object naming the field at fault"}
    return {
        "requestBody": {"required": True, "content": {
            "application/json": {"schema": _inline_refs(schema, defs)}}},
        "responses": {"200": {"description": "a chat.completion, or a text/event-stream of "
                                             "chat.completion.chunk events when stream is true"},
                      **{code: error for code in ("400", "401", "404", "413", "503", "504")}},
    }


def _inline_refs(node: Any, defs: dict[str, Any]) -> Any:
    """Replace pydantic's local `#/$defs/X` references, which OpenAPI cannot resolve here."""
    if isinstance(node, dict):
        ref = node.get("$ref", "")
        if ref.startswith("#/$defs/"):
            return _inline_refs(defs[ref.removeprefix("#/$defs/")], defs)
        return {k: _inline_refs(v, defs) for k, v in node.items()}
    if isinstance(node, list):
        return [_inline_refs(v, defs) for v in node]
    return node


def check_prompt_length(prompt_tokens: int, max_tokens: int, limits: Limits) -> None:
    if prompt_tokens + max_tokens > limits.max_model_len:
        raise ApiError(400, f"messages: the prompt is {prompt_tokens} tokens; with max_tokens "
                            f"{max_tokens} it exceeds the context length {limits.max_model_len}",
                       "messages", "context_length_exceeded")


def key_digest(api_key: str | None) -> str | None:
    """Replicas hold a digest of the key, never the key: init args show up in Serve's state."""
    return hashlib.sha256(api_key.encode()).hexdigest() if api_key else None


def check_auth(header: str | None, expected_digest: str | None) -> None:
    """Bearer-token check against the key's digest (no key configured: everyone may call)."""
    if expected_digest is None:
        return
    token = header.removeprefix("Bearer ") if header and header.startswith("Bearer ") else None
    if token is None or not hmac.compare_digest(key_digest(token) or "", expected_digest):
        raise ApiError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                       None, "invalid_api_key")


def completion_body(req_id: str, model: str, created: int, text: str, finish: str,
                    prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "id": req_id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "finish_reason": finish}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


def chunk_body(req_id: str, model: str, created: int, delta: dict[str, str],
               finish: str | None) -> dict[str, Any]:
    return {"id": req_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
