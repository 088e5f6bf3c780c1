"""The Ray Data generation runner: a stage's rows through an actor pool of engines.

Each input batch is one Ray Data block and, once generated, one committed shard in the stage
store, written by the worker itself: output streams to disk as it is made, and a resumed stage
skips every id already committed. Ray Data restarts a dead actor and retries its batch
(`max_restarts=-1`, `max_task_retries=-1` are its defaults for actor pools); a retried batch
writes the same shard name again, so nothing is doubled.

We use plain `map_batches` over our own engine class rather than `ray.data.llm`: on CPU the
latter needs a placement-group work-around, can deadlock its helper stages on two cores, and
measured slower here (see FIELD_NOTES.md).
"""

from __future__ import annotations

import logging
import re
import time
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


@dataclass(frozen=True)
class BatchResult:
    kept: pa.Table
    rejects: pa.Table  # kept and rejects together cover every input id of the batch
    prompt_tokens: int
    completion_tokens: int


class BatchTask(Protocol):
    """What a generation stage plugs into the runner: one batch of rows in, tables out.

    A task may call the engine more than once per batch (self_align decodes thoughts, then the
    answer), so it drives the engine itself.
    """

    def process(self, engine: Engine, batch: pa.Table) -> BatchResult: ...


@dataclass(frozen=True)
class TaskSpec:
    """A picklable recipe for building a BatchTask inside a worker, once it has a tokenizer."""

    factory: Callable[..., BatchTask]
    kwargs: dict[str, Any]

    def build(self, tokenizer: Any) -> BatchTask:
        return self.factory(tokenizer=tokenizer, **self.kwargs)


class GenerationWorker:
    """One engine in the actor pool; `__call__` is one batch = one shard."""

    def __init__(self, model_path: str, engine_cfg: EngineConfig, task: TaskSpec,
                 store: StageStore, seed: int):
        from dromedary_ray.engines import make_engine
        from dromedary_ray.engines.timeout import BatchDeadline

        self.engine = make_engine(model_path, engine_cfg, seed=seed)
        # A hung engine call fails the stage with a clear error instead of stalling the run.
        self.deadline = BatchDeadline(engine_cfg.call_timeout_s, stage=store.stage)
        self.task = task.build(self.engine.tokenizer)
        self.store = store

    def __call__(self, batch: pa.Table) -> pa.Table:
        start, started = time.perf_counter(), time.time()
        ids = batch["id"].to_pylist()
        result = self.deadline.run(lambda: self.task.process(self.engine, batch), len(ids))
        maybe_die("worker_batch")  # fault tests: die after the work, before the commit
        name = shard_name(ids)
        self.store.write_shard(result.kept, result.rejects, name)
        summary = BatchSummary(
            shard=name,
            rows=len(ids),
            kept=result.kept.num_rows,
            rejected=result.rejects.num_rows,
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            started=started,
            seconds=time.perf_counter() - start,
        )
        return BatchSummary.to_table([summary])


def run_generation(
    rows: pa.Table,
    *,
    store: StageStore,
    model_path: str,
    engine_cfg: EngineConfig,
    task: TaskSpec,
    seed: int = 0,
    desc: str = "generate",
    on_batch: Callable[[BatchSummary], None] | None = None,
) -> list[BatchSummary]:
    """Generate for every row of `rows` (those not yet committed), streaming shards to `store`."""
    import ray
    from tqdm import tqdm

    if rows.num_rows == 0:
        return []
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # ours below counts rows, not Ray's internal operators
    ctx.print_on_execution_start = False
    bs = engine_cfg.batch_size
    blocks = [rows.slice(i, bs) for i in range(0, rows.num_rows, bs)]
    ds = ray.data.from_arrow(blocks).map_batches(
        GenerationWorker,
        fn_constructor_kwargs=dict(model_path=model_path, engine_cfg=engine_cfg, task=task,
                                   store=store, seed=seed),
        batch_size=None,  # one block = one batch = one shard
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=engine_cfg.num_engines),
        num_cpus=engine_cfg.cpus_per_engine,
        num_gpus=engine_cfg.gpus_per_engine or None,
        # The generation pool's marker, one unit per GPU (one for a CPU engine): without it
        # the autoscaler may grow any pool whose nodes have the engine's CPUs and GPUs.
        resources=pool_resources("generation", engine_cfg.gpus_per_engine or 1) or None,
        runtime_env={"env_vars": fault_env()},
    )
    summaries: list[BatchSummary] = []
    with tqdm(total=rows.num_rows, desc=desc, unit="row", dynamic_ncols=True) as bar, \
            _engine_timeouts_raised_plainly():
        for out in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for summary in BatchSummary.from_table(out):
                summaries.append(summary)
                bar.update(summary.rows)
                tokens = sum(s.completion_tokens for s in summaries)
                bar.set_postfix(kept=sum(s.kept for s in summaries), tokens=tokens)
                maybe_die("driver_shard")  # fault tests: the driver dies mid-stage
                if on_batch:
                    on_batch(summary)
    return summaries


@contextmanager
def _engine_timeouts_raised_plainly() -> Iterator[None]:
    """Re-raise a worker's EngineTimeoutError as itself. Ray Data wraps a worker's exception
    in its own task-error types, which the CLI would print as a long traceback; ours carries
    the message the user needs (stage, limit, the setting to change)."""
    from dromedary_ray.engines.timeout import EngineTimeoutError

    try:
        yield
    except Exception as err:
        found = _find_in_chain(err, EngineTimeoutError)
        # Across processes the chain may be lost in pickling; the worker's traceback text,
        # which Ray keeps in the message, still names our error.
        text = re.search(r"EngineTimeoutError: (.+)", str(err))
        if found is None and text is None:
            raise
        raise EngineTimeoutError(str(found) if found else text.group(1)) from err


def _find_in_chain(err: BaseException, kind: type) -> BaseException | None:
    seen: set[int] = set()
    todo: list[BaseException | None] = [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, kind):
            return e
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None)]
    return None
