"""The step loop: one thread that drives a vLLM engine, so that requests from anywhere in the
process join the running batch the moment they are submitted.

`LLM.generate` adds a list of requests and steps the engine until all of them are done: a
request that arrives meanwhile (the next batch, or a row's answer once its own thoughts are
written) waits for the whole list, and the engine idles through the list's long tail. The loop
runs the same two calls, `add_request` and `step`, but takes new requests between any two
steps, so vLLM's scheduler always sees everything there is to do (continuous batching across
batches and phases).

Only the loop thread touches the engine: `submit` puts a request in a queue and returns a
future at once. The engine core stays in this process (`engine.in_process`), so a killed worker
leaves no orphaned engine behind; vLLM's `AsyncLLM` would need its own engine-core process.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

log = logging.getLogger(__name__)

_STOP = object()


class EngineLoopError(RuntimeError):
    """The engine failed while stepping; every request it held fails with this."""


class StepLoop:
    """Feeds `llm_engine` (a vLLM `LLMEngine`) from a queue and resolves one future per request."""

    def __init__(self, llm_engine: Any, name: str = "engine-loop"):
        self.engine = llm_engine
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._pending: dict[str, tuple[Future, Callable[[Any], Any]]] = {}
        self._ids = itertools.count()
        self._failure: BaseException | None = None  # set once, when the loop has ended
        self._lock = threading.Lock()  # no request is queued after the loop has ended
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, prompt: Any, params: Any, convert: Callable[[Any], Any] = lambda out: out,
               lora_request: Any = None) -> Future:
        """Queue one request; the future holds `convert(RequestOutput)` once it has finished.
        Give `params` vLLM's `output_kind=FINAL_ONLY`: the loop reads only finished outputs,
        and the default kind builds one for every request at every step."""
        future: Future = Future()
        with self._lock:
            if self._failure is not None:
                raise EngineLoopError(f"the engine loop has ended: {self._failure}")
            self._inbox.put((f"loop-{next(self._ids)}", prompt, params, lora_request, convert,
                             future))
        return future

    def close(self, timeout: float = 10.0) -> None:
        """Stop the thread after the current step; requests still pending fail."""
        self._inbox.put(_STOP)
        self._thread.join(timeout)

    # --- the loop thread ---------------------------------------------------------------------

    def _run(self) -> None:
        failure: BaseException = EngineLoopError("the engine loop was closed")
        try:
            while self._admit(wait=not self.engine.has_unfinished_requests()):
                for out in self.engine.step():
                    if out.finished:
                        self._resolve(out)
        except BaseException as err:  # handed to every waiting caller below
            log.exception("engine loop failed")
            failure = err
        with self._lock:
            self._failure = failure
        self._fail_pending(failure)

    def _admit(self, wait: bool) -> bool:
        """Add every queued request to the engine (blocking for one if `wait`); False on stop."""
        while True:
            try:
                item = self._inbox.get(block=wait)
            except queue.Empty:
                return True
            if item is _STOP:
                return False
            wait = False
            rid, prompt, params, lora, convert, future = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                self.engine.add_request(rid, prompt, params, lora_request=lora)
            except Exception as err:  # a bad request fails alone, not the loop
                future.set_exception(err)
                continue
            self._pending[rid] = (future, convert)

    def _resolve(self, out: Any) -> None:
        future, convert = self._pending.pop(out.request_id)
        try:
            future.set_result(convert(out))
        except Exception as err:
            future.set_exception(err)

    def _fail_pending(self, err: BaseException) -> None:
        reason = err if isinstance(err, EngineLoopError) else EngineLoopError(str(err))
        for future, _ in self._pending.values():
            future.set_exception(reason)
        self._pending.clear()
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if item is not _STOP and item[-1].set_running_or_notify_cancel():
                item[-1].set_exception(reason)
