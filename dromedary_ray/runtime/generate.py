"""The generation runner: a stage's rows through a pool of engine actors that are kept full.

Rows are cut into batches of `engine.batch_size`. A batch is one call on one engine actor and,
once generated, one committed shard in the stage store, written by the actor itself: output
streams to disk as it is made, the driver holds only batch summaries, and a resumed stage skips
every id already committed.

What keeps an engine busy (measured in benchmarks/main_job.py):
- each actor holds `engine.batches_in_flight` batches at once (a threaded Ray actor), and their
  requests share the engine through its step loop (engines/loop.py): one batch's long tail
  decodes beside the next batch's prefill instead of leaving the engine idle;
- a multi-phase task starts a row's next phase as soon as that row's previous phase has ended
  (`engines.base.finished_groups`), not when its whole batch has;
- the actors live as long as their `EnginePool`: `Engines` keeps one pool up across the passes
  of a stage (synthesize's rounds, preferences' two phases) and across consecutive stages on the
  same model, so the ~25 s engine start is paid once, not per pass;
- engine actors run at normal priority: Ray starts workers at nice 15, which let any other busy
  process on the node (Ray's own daemons included) preempt the engine.

Faults: an actor whose process dies is restarted (`max_restarts=-1`) and Ray runs the calls it
held again (`max_task_retries=-1`); a retried batch samples with the same per-row seeds and
writes the same shard name, so no row is lost or doubled. A hung engine fails its batch after
`engine.call_timeout_s` with EngineTimeoutError, which is not retried (it would hang again).

We drive plain Ray actors rather than Ray Data's `map_batches`: a Ray Data actor pool lives for
one dataset, so every pass started its engines anew, and the rows here are prompts (a few MB at
most), which a driver dispatches without a streaming executor.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import pyarrow as pa

from dromedary_ray.config import EngineConfig
from dromedary_ray.data.schemas import BatchSummary
from dromedary_ray.data.store import StageStore, shard_name
from dromedary_ray.engines.base import Engine
from dromedary_ray.runtime.cluster import pool_resources
from dromedary_ray.runtime.faults import fault_env, maybe_die

log = logging.getLogger(__name__)

# Ray starts worker processes at nice 15; an engine sharing a node with any busy normal-priority
# process then all but stops (serve/app.py has the measurement). Engines run at nice 0.
ENGINE_ENV = {"RAY_worker_niceness": "0"}


@dataclass(frozen=True)
class BatchResult:
    kept: pa.Table
    rejects: pa.Table  # kept and rejects together cover every input id of the batch
    prompt_tokens: int
    completion_tokens: int


class BatchTask(Protocol):
    """What a generation stage plugs into the runner: one batch of rows in, tables out.

    A task may call the engine more than once per batch (self_align decodes thoughts, then the
    answer), so it drives the engine itself. Several batches run at once on one engine, each on
    its own thread: a task keeps no per-batch state on `self`.
    """

    def process(self, engine: Engine, batch: pa.Table) -> BatchResult: ...


@dataclass(frozen=True)
class TaskSpec:
    """A picklable recipe for building a BatchTask inside a worker, once it has a tokenizer."""

    factory: Callable[..., BatchTask]
    kwargs: dict[str, Any]

    def build(self, tokenizer: Any) -> BatchTask:
        return self.factory(tokenizer=tokenizer, **self.kwargs)


class GenerationActor:
    """One engine; `process` is one batch = one shard. Ray runs `engine.batches_in_flight`
    calls at once on it (a threaded actor), all feeding the same engine."""

    def __init__(self, model_path: str, engine_cfg: EngineConfig):
        from dromedary_ray.engines import make_engine
        from dromedary_ray.engines.timeout import BatchDeadline

        # Every request carries its own seed (per row), so the engine's seed decides nothing.
        self.engine = make_engine(model_path, engine_cfg, seed=0)
        # A hung engine call fails the stage with a clear error instead of stalling the run.
        self.deadline = BatchDeadline(engine_cfg.call_timeout_s,
                                      workers=engine_cfg.batches_in_flight)
        self._tasks: dict[str, BatchTask] = {}  # by run_generation call
        self._lock = threading.Lock()
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    def ready(self) -> bool:
        return True

    def process(self, call: str, spec: TaskSpec, store: StageStore,
                batch: pa.Table) -> BatchSummary:
        start, started = time.perf_counter(), time.time()
        task = self._task(call, spec)
        ids = batch["id"].to_pylist()
        result = self.deadline.run(lambda: task.process(self.engine, batch), len(ids),
                                   stage=store.stage)
        maybe_die("worker_batch")  # fault tests: die after the work, before the commit
        name = shard_name(ids)
        store.write_shard(result.kept, result.rejects, name)
        maybe_die("worker_committed")  # fault tests: die after the commit, before the reply
        return BatchSummary(
            shard=name, rows=len(ids), kept=result.kept.num_rows,
            rejected=result.rejects.num_rows, prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens, started=started,
            seconds=time.perf_counter() - start, worker=self.name,
        )

    def _task(self, call: str, spec: TaskSpec) -> BatchTask:
        with self._lock:  # the first batch of a call builds its task; the others reuse it
            if call not in self._tasks:
                self._tasks = {call: spec.build(self.engine.tokenizer)}  # older calls are over
            return self._tasks[call]

    def close(self) -> None:
        if not self.deadline.broken:  # a stuck call still holds the engine: let the kill end it
            self.engine.close()


class EnginePool:
    """`engine.num_engines` GenerationActors on one model, up until `close()`."""

    def __init__(self, model_path: str, engine_cfg: EngineConfig):
        import ray

        self.model_path, self.cfg = model_path, engine_cfg
        actor = ray.remote(GenerationActor).options(
            num_cpus=engine_cfg.cpus_per_engine,
            num_gpus=engine_cfg.gpus_per_engine or None,
            # The generation pool's marker, one unit per GPU (one for a CPU engine): without it
            # the autoscaler may grow any pool whose nodes have the engine's CPUs and GPUs.
            resources=pool_resources("generation", engine_cfg.gpus_per_engine or 1) or None,
            max_concurrency=engine_cfg.batches_in_flight + 1,  # + ready() and close()
            max_restarts=-1, max_task_retries=-1,
            runtime_env={"env_vars": {**ENGINE_ENV, **fault_env()}},
        )
        self.actors = [actor.remote(model_path, engine_cfg)
                       for _ in range(engine_cfg.num_engines)]
        log.info("starting %d engine(s) on %s", len(self.actors), model_path)

    def close(self) -> None:
        import ray

        try:
            ray.get([a.close.remote() for a in self.actors], timeout=60)
        except Exception as err:  # a dead or stuck actor: the kill below ends it either way
            log.warning("closing engines: %s", err)
        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []


class Engines:
    """The engine pools of one driver: one model's at a time, reused by every generation pass
    for that model and engine settings, closed when another is asked for or on `close()` (the
    driver closes them before a stage that trains: it needs the engines' GPUs and memory)."""

    def __init__(self) -> None:
        self._pool: EnginePool | None = None

    def pool(self, model_path: str, engine_cfg: EngineConfig) -> EnginePool:
        current = self._pool
        if current and (current.model_path, current.cfg) != (model_path, engine_cfg):
            self.close()
        if self._pool is None:
            self._pool = EnginePool(model_path, engine_cfg)
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __enter__(self) -> Engines:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_generation(
    rows: pa.Table,
    *,
    store: StageStore,
    model_path: str,
    engine_cfg: EngineConfig,
    task: TaskSpec,
    engines: Engines | None = None,
    desc: str = "generate",
    on_batch: Callable[[BatchSummary], None] | None = None,
) -> list[BatchSummary]:
    """Generate for every row of `rows` (those not yet committed), streaming shards to `store`.

    `engines`: the driver's pools, kept for later passes; without it the engines start for this
    call and stop at its end.
    """
    if rows.num_rows == 0:
        return []
    if engines is None:
        with Engines() as own:
            return run_generation(rows, store=store, model_path=model_path,
                                  engine_cfg=engine_cfg, task=task, engines=own, desc=desc,
                                  on_batch=on_batch)
    pool = engines.pool(model_path, engine_cfg)
    bs = engine_cfg.batch_size
    batches = deque(rows.slice(i, bs) for i in range(0, rows.num_rows, bs))
    with _progress(rows.num_rows, desc) as progress, _our_errors_raised_plainly():
        return _dispatch(pool, batches, store, task, progress, on_batch)


def _dispatch(pool: EnginePool, batches: deque[pa.Table], store: StageStore, task: TaskSpec,
              progress: Callable[[BatchSummary], None],
              on_batch: Callable[[BatchSummary], None] | None) -> list[BatchSummary]:
    """Keep `batches_in_flight` batches on every actor until all are done; summaries in the
    order the batches finished."""
    import ray

    call, spec = uuid.uuid4().hex, ray.put(task)
    load = [0] * len(pool.actors)
    in_flight: dict[Any, int] = {}  # the call's ObjectRef -> its actor's index
    summaries: list[BatchSummary] = []
    while batches or in_flight:
        while batches and min(load) < pool.cfg.batches_in_flight:
            a = load.index(min(load))  # the least busy actor
            ref = pool.actors[a].process.remote(call, spec, store, batches.popleft())
            in_flight[ref], load[a] = a, load[a] + 1
        (ref,), _ = ray.wait(list(in_flight), num_returns=1)
        load[in_flight.pop(ref)] -= 1
        summary = ray.get(ref)
        summaries.append(summary)
        progress(summary)
        maybe_die("driver_shard")  # fault tests: the driver dies mid-stage
        if on_batch:
            on_batch(summary)
    return summaries


@contextmanager
def _progress(total: int, desc: str) -> Iterator[Callable[[BatchSummary], None]]:
    """A row-count progress bar with kept rows and generated tokens per second so far."""
    from tqdm import tqdm

    start, kept, tokens = time.perf_counter(), 0, 0
    with tqdm(total=total, desc=desc, unit="row", dynamic_ncols=True) as bar:
        def update(summary: BatchSummary) -> None:
            nonlocal kept, tokens
            kept, tokens = kept + summary.kept, tokens + summary.completion_tokens
            bar.update(summary.rows)
            bar.set_postfix(kept=kept, tok_s=round(tokens / (time.perf_counter() - start), 1))
        yield update


@contextmanager
def _our_errors_raised_plainly() -> Iterator[None]:
    """Re-raise our own error from a worker (a hung engine, a full disk) as itself. Ray wraps a
    worker's exception in its own task-error types, which would print as a long traceback; ours
    carries the message the user needs (stage, limit or path, the setting to change)."""
    from dromedary_ray.engines.timeout import EngineTimeoutError
    from dromedary_ray.errors import user_error

    try:
        yield
    except Exception as err:
        ours = user_error(err)
        if ours is not None:
            raise ours from err
        # Across processes the chain may be lost in pickling; the worker's traceback text,
        # which Ray keeps in the message, still names our error.
        text = re.search(r"EngineTimeoutError: (.+)", str(err))
        if text is None:
            raise
        raise EngineTimeoutError(text.group(1)) from err
