"""`dromedary chat`: a terminal conversation with a served model (URL) or a local engine."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from typing import Any, TextIO

Reply = Callable[[list[dict[str, str]]], Iterator[str]]


def http_replier(url: str, model: str | None, api_key: str | None, max_tokens: int) -> Reply:
    """Stream replies from an OpenAI-compatible server (ours or any other)."""
    import httpx

    base = url.rstrip("/")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    if model is None:
        listing = httpx.get(f"{base}/v1/models", headers=headers, timeout=30).json()
        model = listing["data"][0]["id"]

    def reply(messages: list[dict[str, str]]) -> Iterator[str]:
        body = {"model": model, "messages": messages, "stream": True, "max_tokens": max_tokens}
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, headers=headers,
                          timeout=300) as resp:
            if resp.status_code != 200:
                resp.read()
                raise RuntimeError(resp.json()["error"]["message"])
            for line in resp.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    yield json.loads(line[6:])["choices"][0]["delta"].get("content", "")

    return reply


def engine_replier(model_path: str, max_tokens: int) -> Reply:
    """Reply from an engine in this process (no server): one whole answer per turn."""
    from dromedary_ray.config import EngineConfig, SamplingConfig
    from dromedary_ray.engines.vllm_engine import VLLMEngine
    from dromedary_ray.prompts import render_chat

    engine = VLLMEngine(model_path, EngineConfig(cpus_per_engine=2, kv_cache_gib=1))
    sampling = SamplingConfig(temperature=0.7, top_p=0.95, max_new_tokens=max_tokens)

    def reply(messages: list[dict[str, str]]) -> Iterator[str]:
        gen = engine.generate([render_chat(engine.tokenizer, messages)], sampling)[0]
        yield gen.error or gen.completions[0].text

    return reply


def chat_loop(reply: Reply, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout,
              system: str | None = None) -> list[dict[str, Any]]:
    """Read user turns until EOF or /exit; print streamed replies; return the transcript."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    stdout.write("dromedary chat: /reset clears the history, /exit or Ctrl-D quits.\n")
    while True:
        stdout.write("you> ")
        stdout.flush()
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            return messages
        if line.strip() == "/reset":
            messages = messages[:1] if system else []
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        stdout.write("model> ")
        parts = []
        for piece in reply(messages):
            parts.append(piece)
            stdout.write(piece)
            stdout.flush()
        stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(parts)})
