"""A Ray Serve application with an OpenAI-compatible chat API over a vLLM engine.

    dromedary serve builtin:smollm2-135m                    # http://127.0.0.1:8000
    serve run configs/serve.yaml                            # replicas/autoscaling from YAML

Routes: POST /v1/chat/completions (JSON or server-sent events), GET /v1/models, GET /health.
One vLLM `AsyncLLM` per replica: concurrent requests share it through continuous batching.
We write our own deployment rather than `ray.serve.llm` so that every bad request gets a 4xx
naming its field before it reaches the engine (see serve/api.py).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from dromedary_ray.config import EngineConfig
from dromedary_ray.serve.api import (
    ApiError,
    ChatRequest,
    Limits,
    chat_openapi,
    check_auth,
    check_prompt_length,
    chunk_body,
    completion_body,
    key_digest,
    parse_chat_request,
)

fastapi_app = FastAPI(title="dromedary-ray")

# Ray runs worker processes at nice 15 (so they yield to its GCS and raylet), and the vLLM engine
# processes a replica starts inherit that: whenever a normal-priority process wants its cores
# (Ray's own daemons included) the engine all but stops. With one busy nice-0 process on one of
# two cores, 16 tokens took 27.5 s at nice 15 and 1.5 s at nice 0. A replica is a latency-bound
# server, so it runs at normal priority, as Ray's own job supervisor does.
#
# vLLM configures Python logging with dictConfig when it is imported, and dictConfig closes every
# handler that exists. In a replica that import comes after Serve has set up its logger, so
# Serve's buffering handler lost its target: from then on it kept every access-log record in
# memory and wrote none (measured: 7,430 records held after 3 minutes, the replica log file one
# line long, RSS +8 MiB/min in the 30-minute soak). With VLLM_CONFIGURE_LOGGING=0, vLLM leaves
# the handlers alone and its own records go through Ray's worker logging like any other.
REPLICA_ENV_VARS = {"RAY_worker_niceness": "0", "VLLM_CONFIGURE_LOGGING": "0"}


@serve.deployment(max_ongoing_requests=64, health_check_period_s=10)
@serve.ingress(fastapi_app)
class ChatServer:
    def __init__(self, model_path: str, served_name: str, engine: dict[str, Any],
                 api_key_digest: str | None = None, default_max_tokens: int = 256):
        cfg = EngineConfig(**engine)
        from dromedary_ray.serve.engine import start_engine

        self.engine, self.tokenizer = start_engine(model_path, cfg)
        self.limits = Limits(served_name, cfg.max_model_len, default_max_tokens)
        self.key_digest = api_key_digest

    def _auth(self, request: Request) -> None:
        check_auth(request.headers.get("authorization"), self.key_digest)

    @fastapi_app.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @fastapi_app.get("/v1/models")
    async def models(self, request: Request) -> JSONResponse:
        try:
            self._auth(request)
        except ApiError as err:
            return JSONResponse(err.body(), status_code=err.status)
        return JSONResponse({"object": "list", "data": [
            {"id": self.limits.served_model, "object": "model", "owned_by": "dromedary-ray"}]})

    @fastapi_app.post("/v1/chat/completions", openapi_extra=chat_openapi())
    async def chat(self, request: Request):
        try:
            self._auth(request)
            length = int(request.headers.get("content-length") or 0)
            if length > self.limits.max_body_bytes:  # refuse before reading a huge body
                raise ApiError(413, f"request body is {length} bytes; the limit is "
                                    f"{self.limits.max_body_bytes}", None, "body_too_large")
            req = parse_chat_request(await request.body(), self.limits)
            prompt_ids = self._encode(req)
            max_tokens = req.max_tokens or self.limits.default_max_tokens
            check_prompt_length(len(prompt_ids), max_tokens, self.limits)
        except ApiError as err:
            return JSONResponse(err.body(), status_code=err.status)
        from dromedary_ray.serve.engine import sampling_params

        params = sampling_params(req, max_tokens)
        req_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            return StreamingResponse(self._stream(prompt_ids, params, req_id, created),
                                     media_type="text/event-stream")
        start = time.perf_counter()
        body = await self._complete(prompt_ids, params, req_id, created)
        # W3C Server-Timing: the engine's share of the request, so a client can tell generation
        # time from HTTP + Serve time (benchmarks/serve.py does).
        engine_ms = (time.perf_counter() - start) * 1000
        return JSONResponse(body, headers={"Server-Timing": f"engine;dur={engine_ms:.1f}"})

    def _encode(self, req: ChatRequest) -> list[int]:
        from dromedary_ray.serve.engine import encode_chat

        return encode_chat(self.tokenizer, [m.model_dump() for m in req.messages])

    async def _complete(self, prompt_ids: list[int], params: Any, req_id: str,
                        created: int) -> dict[str, Any]:
        from vllm.inputs import TokensPrompt

        final = None
        async for out in self.engine.generate(TokensPrompt(prompt_token_ids=prompt_ids),
                                              params, req_id):
            final = out
        comp = final.outputs[0]
        return completion_body(req_id, self.limits.served_model, created, comp.text,
                               comp.finish_reason or "stop", len(prompt_ids),
                               len(comp.token_ids))

    async def _stream(self, prompt_ids: list[int], params: Any, req_id: str,
                      created: int) -> AsyncIterator[str]:
        from vllm.inputs import TokensPrompt

        model = self.limits.served_model
        first = chunk_body(req_id, model, created, {"role": "assistant", "content": ""}, None)
        yield f"data: {json.dumps(first)}\n\n"
        async for out in self.engine.generate(TokensPrompt(prompt_token_ids=prompt_ids),
                                              params, req_id):
            comp = out.outputs[0]
            finish = comp.finish_reason if out.finished else None
            if comp.text or finish:
                chunk = chunk_body(req_id, model, created, {"content": comp.text}, finish)
                yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"


def build_app(args: dict[str, Any]) -> serve.Application:
    """Application builder for `serve run` YAML (import_path dromedary_ray.serve.app:build_app).

    args: model (a model spec), served_model_name, engine (EngineConfig fields),
    api_key_env (name of an env var holding the key), default_max_tokens,
    num_replicas or autoscaling_config.
    """
    import os

    from dromedary_ray.models import resolve_model

    engine = dict(args.get("engine", {}))
    cfg = EngineConfig(**engine)
    key_env = args.get("api_key_env")
    api_key = os.environ.get(key_env) if key_env else None
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": cfg.cpus_per_engine,
                              "num_gpus": cfg.gpus_per_engine or 0,
                              "runtime_env": {"env_vars": dict(REPLICA_ENV_VARS)}},
    }
    if "autoscaling_config" in args:
        options["autoscaling_config"] = args["autoscaling_config"]
    else:
        options["num_replicas"] = int(args.get("num_replicas", 1))
    return ChatServer.options(**options).bind(
        resolve_model(args["model"]),
        args.get("served_model_name", args["model"]),
        engine,
        key_digest(api_key),
        int(args.get("default_max_tokens", 256)),
    )


def deploy(app: serve.Application, name: str, host: str = "127.0.0.1", port: int = 0) -> str:
    """Start Serve's HTTP proxy on `host:port` (0: a free port) and run `app` at "/"; returns
    its URL. `dromedary serve`, the Serve tests and the benchmarks all start it this way."""
    from dromedary_ray.runtime.cluster import free_port

    port = port or free_port(host)
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name=name, route_prefix="/", blocking=False)
    return f"http://{host}:{port}"
