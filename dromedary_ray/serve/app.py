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
from dromedary_ray.errors import ConfigError
from dromedary_ray.serve.api import (
    REQUEST_TIMEOUT_S,
    ApiError,
    ChatRequest,
    Limits,
    body_too_large,
    chat_openapi,
    check_auth,
    check_prompt_length,
    chunk_body,
    completion_body,
    key_digest,
    parse_chat_request,
    read_body,
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


# Past max_ongoing_requests a replica's requests wait at the proxy; past this many waiting,
# Serve answers 503 (with Retry-After) instead of queueing without bound.
MAX_QUEUED_REQUESTS = 256


@serve.deployment(max_ongoing_requests=64, max_queued_requests=MAX_QUEUED_REQUESTS,
                  backpressure_config={"status_code": 503, "retry_after_s": 1},
                  health_check_period_s=10)
@serve.ingress(fastapi_app)
class ChatServer:
    def __init__(self, model_path: str, served_name: str, engine: dict[str, Any],
                 api_key_digest: str | None = None, default_max_tokens: int = 256,
                 request_timeout_s: float = REQUEST_TIMEOUT_S):
        cfg = EngineConfig(**engine)
        from dromedary_ray.serve.engine import start_engine

        self.engine, self.tokenizer = start_engine(model_path, cfg)
        self.limits = Limits(served_name, cfg.max_model_len, default_max_tokens,
                             request_timeout_s=request_timeout_s)
        self.key_digest = api_key_digest

    async def check_health(self) -> None:
        """Serve calls this every health_check_period_s; raising (three times running) marks
        the replica unhealthy and Serve replaces it. The replica's actor outlives a dead vLLM
        engine-core process, so without this it stayed "healthy" and answered every request
        with an error, forever. AsyncLLM.check_health raises once the core has died."""
        await self.engine.check_health()

    def _auth(self, request: Request) -> None:
        check_auth(request.headers.get("authorization"), self.key_digest)

    @fastapi_app.get("/health")
    async def health(self) -> JSONResponse:
        if self.engine.errored:  # for load balancers that probe HTTP rather than ask Serve
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return JSONResponse({"status": "ok"})

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
            req, prompt_ids, params = await self._prepare(request)
        except ApiError as err:
            return JSONResponse(err.body(), status_code=err.status)
        req_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            return StreamingResponse(self._stream(prompt_ids, params, req_id, created),
                                     media_type="text/event-stream")
        start = time.perf_counter()
        try:
            body = await self._complete(prompt_ids, params, req_id, created)
        except ApiError as err:
            return JSONResponse(err.body(), status_code=err.status)
        # W3C Server-Timing: the engine's share of the request, so a client can tell generation
        # time from HTTP + Serve time (benchmarks/serve.py does).
        engine_ms = (time.perf_counter() - start) * 1000
        return JSONResponse(body, headers={"Server-Timing": f"engine;dur={engine_ms:.1f}"})

    async def _prepare(self, request: Request) -> tuple[ChatRequest, list[int], Any]:
        """Everything that can refuse a request before the engine sees it, as ApiErrors."""
        from dromedary_ray.serve.engine import encode_chat, engine_error, sampling_params

        self._auth(request)
        if self.engine.errored:  # before a stream's 200: the client sees a plain 503
            raise engine_error(self.engine.dead_error)
        limit = self.limits.max_body_bytes
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > limit:  # refuse before reading it
            raise body_too_large(limit, int(length))
        req = parse_chat_request(await read_body(request.stream(), limit), self.limits)
        prompt_ids = encode_chat(self.tokenizer, [m.model_dump() for m in req.messages])
        max_tokens = req.max_tokens or self.limits.default_max_tokens
        check_prompt_length(len(prompt_ids), max_tokens, self.limits)
        return req, prompt_ids, sampling_params(req, max_tokens)

    def _outputs(self, prompt_ids: list[int], params: Any, req_id: str) -> AsyncIterator[Any]:
        from vllm.inputs import TokensPrompt

        from dromedary_ray.serve.engine import bounded_outputs

        return bounded_outputs(self.engine, TokensPrompt(prompt_token_ids=prompt_ids), params,
                               req_id, self.limits.request_timeout_s)

    async def _complete(self, prompt_ids: list[int], params: Any, req_id: str,
                        created: int) -> dict[str, Any]:
        final = None
        async for out in self._outputs(prompt_ids, params, req_id):
            final = out
        comp = final.outputs[0]
        return completion_body(req_id, self.limits.served_model, created, comp.text,
                               comp.finish_reason or "stop", len(prompt_ids),
                               len(comp.token_ids))

    async def _stream(self, prompt_ids: list[int], params: Any, req_id: str,
                      created: int) -> AsyncIterator[str]:
        model = self.limits.served_model
        first = chunk_body(req_id, model, created, {"role": "assistant", "content": ""}, None)
        yield f"data: {json.dumps(first)}\n\n"
        try:
            async for out in self._outputs(prompt_ids, params, req_id):
                comp = out.outputs[0]
                finish = comp.finish_reason if out.finished else None
                if comp.text or finish:
                    chunk = chunk_body(req_id, model, created, {"content": comp.text}, finish)
                    yield f"data: {json.dumps(chunk)}\n\n"
        except ApiError as err:  # the 200 is gone: the error travels as the stream's last event
            yield err.event()
            return
        yield "data: [DONE]\n\n"


def build_app(args: dict[str, Any]) -> serve.Application:
    """Application builder for `serve run` YAML (import_path dromedary_ray.serve.app:build_app).

    args: model (a model spec), served_model_name, engine (EngineConfig fields),
    api_key_env (name of an env var holding the key; named, it must be set), default_max_tokens,
    request_timeout_s (per generation; past it a 504), max_ongoing_requests and
    max_queued_requests (past both, Serve answers 503), health_check_period_s,
    num_replicas or autoscaling_config.
    """
    from dromedary_ray.models import resolve_model
    from dromedary_ray.serve.engine import refuse_remote_code

    engine = dict(args.get("engine", {}))
    cfg = EngineConfig(**engine)
    digest = key_digest(_api_key(args.get("api_key_env")))
    timeout_s = float(args.get("request_timeout_s", REQUEST_TIMEOUT_S))
    if not timeout_s > 0:
        raise ConfigError(f"request_timeout_s: must be a positive number of seconds, "
                          f"got {args['request_timeout_s']!r}")
    model_path = resolve_model(args["model"])
    refuse_remote_code(model_path)
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": cfg.cpus_per_engine,
                              "num_gpus": cfg.gpus_per_engine or 0,
                              "runtime_env": {"env_vars": dict(REPLICA_ENV_VARS)}},
    }
    for key in ("max_ongoing_requests", "max_queued_requests", "health_check_period_s"):
        if key in args:
            options[key] = args[key]
    if "autoscaling_config" in args:
        options["autoscaling_config"] = args["autoscaling_config"]
    else:
        options["num_replicas"] = int(args.get("num_replicas", 1))
    return ChatServer.options(**options).bind(
        model_path, args.get("served_model_name", args["model"]), engine, digest,
        int(args.get("default_max_tokens", 256)), timeout_s)


def _api_key(env_name: str | None) -> str | None:
    """The key from the variable `api_key_env` names. A variable named but unset or empty
    fails closed: serving without auth because a Secret or an export went missing is the
    one outcome an operator who named a key never wants."""
    import os

    if not env_name:
        return None
    key = os.environ.get(env_name, "")
    if not key.strip():
        raise ConfigError(f"api_key_env: the environment variable {env_name} is "
                          f"{'empty' if env_name in os.environ else 'not set'}; set it to the API "
                          "key, or drop api_key_env to serve without a key (loopback only)")
    return key


def deploy(app: serve.Application, name: str, host: str = "127.0.0.1", port: int = 0) -> str:
    """Start Serve's HTTP proxy on `host:port` (0: a free port) and run `app` at "/"; returns
    its URL. `dromedary serve`, the Serve tests and the benchmarks all start it this way.

    Where Serve already runs on the cluster, Ray keeps its proxies as they are and ignores new
    HTTP options (with a log warning only), so the app would be served on whatever host the
    first caller chose, past `dromedary serve`'s loopback check. Refuse unless they match.
    """
    from ray.serve.context import _get_global_client

    from dromedary_ray.runtime.cluster import free_port

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        port = port or free_port(host)
        serve.start(http_options={"host": host, "port": port})
    else:
        running = client.http_config
        port = running_serve_port(running.host, running.port, host, port)
    serve.run(app, name=name, route_prefix="/", blocking=False)
    return f"http://{host}:{port}"


def running_serve_port(running_host: str | None, running_port: int, host: str, port: int) -> int:
    """The port to use on a cluster whose Serve proxies already listen on running_host:port:
    theirs, when `host` is theirs and `port` is theirs or 0 (any); otherwise a ConfigError."""
    if running_host == host and port in (0, running_port):
        return running_port
    wanted = f"{host}:{port or 'any port'}"
    stop = "stop the running Serve first (`serve shutdown`, which also removes its applications)"
    if running_host is None:
        raise ConfigError(f"Ray Serve already runs on this cluster with HTTP turned off; Ray "
                          f"cannot add a proxy on {wanted} to it. To serve over HTTP, {stop}")
    where = f"{running_host}:{running_port}"
    raise ConfigError(
        f"Ray Serve already runs on this cluster with its HTTP proxies on {where}, and Ray "
        f"cannot move them to {wanted}: the app would be served on {where} instead. Ask for "
        f"host {running_host} and port {running_port} (--host/--port), or {stop}")
