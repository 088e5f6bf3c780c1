"""A deadline on engine calls: a hung engine fails its stage with a clear error instead of
stalling the run forever.

A stuck vLLM step (a wedged engine-core process, a deadlocked collective) blocks its caller with
no error at all, and the runner would wait on that batch for ever. `BatchDeadline` runs each
batch's engine work on a helper thread (one per batch in flight) and waits at most `seconds`
for it. Past that it raises `EngineTimeoutError`, which names the stage and the limit; Ray does
not retry application errors, so the stage (and the run) fails at once with that message. The
helper thread cannot be interrupted, so the engine is marked broken and every later call fails
fast.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TypeVar

from dromedary_ray.errors import StageError
from dromedary_ray.runtime.faults import maybe_hang

T = TypeVar("T")


class EngineTimeoutError(StageError):
    """An engine call ran past `engine.call_timeout_s`."""


class BatchDeadline:
    """Runs one batch's engine work with a deadline (see the module docstring).

    The deadline wraps the task's whole `process(engine, batch)`, not one engine method, so it
    covers every way a task uses its engine (generation, log-likelihood scoring, the engine's
    own `llm`) without a wrapper that would have to imitate each of them.
    """

    def __init__(self, seconds: float, workers: int = 1):
        self.seconds = seconds
        self._broken: str | None = None
        self._pool = ThreadPoolExecutor(workers, "engine-call", initializer=_same_torch_threads,
                                        initargs=(_torch_threads(),))

    def run(self, work: Callable[[], T], rows: int, stage: str) -> T:
        """`work()`, or EngineTimeoutError once it has run `seconds` on a batch of `rows`."""
        if self._broken:
            raise EngineTimeoutError(self._broken)
        future = self._pool.submit(_hang_point_then, work)
        try:
            return future.result(timeout=self.seconds)
        except FutureTimeout:
            self._broken = (
                f"stage {stage}: an engine call on {rows} prompts did not return "
                f"within engine.call_timeout_s = {self.seconds:g} s; the engine looks hung "
                f"(raise engine.call_timeout_s if calls this large are legitimately slower)")
            raise EngineTimeoutError(self._broken) from None

    @property
    def broken(self) -> bool:
        """True after a timeout: the stuck call still holds the engine (do not close it)."""
        return self._broken is not None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _hang_point_then(work: Callable[[], T]) -> T:
    maybe_hang("engine_call")  # fault tests: the call never returns
    return work()


def _torch_threads() -> int | None:
    import sys

    torch = sys.modules.get("torch")  # only when the engine imported it; no import cost here
    return torch.get_num_threads() if torch is not None else None


def _same_torch_threads(count: int | None) -> None:
    """OpenMP thread counts are per calling thread: give the helper the caller's count, so
    that moving the call off the main thread changes neither speed nor core use."""
    if count is not None:
        import torch

        torch.set_num_threads(count)
    threading.current_thread().name = "engine-call"
