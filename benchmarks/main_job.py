"""The main job's generation, side by side in one run (issue 14): how close the runner comes to
what its engine can do on the same work.

    python benchmarks/main_job.py [--prompts 205] [--skip synthesize]

On the main job's own rows (the shipped seed prompts, configs/local.yaml's model, engine and
self_align settings) and then on one synthesize round (round 1 of the default config):

- ceiling: the task called directly on one in-process vLLM engine with every row in one call
  and its phases in lockstep (thoughts for all rows, then answers for all), no Ray. Engine
  start-up excluded.
- runner as it was: 32-row batches (the old embedded default), one at a time per engine, each
  batch's phases in lockstep: the scheduling of the runner before issue 14. (It was also a Ray
  Data actor pool at nice 15 that started its engines for every pass; this row does not
  reproduce those.)
- runner: the runner as it is, with the config's batch size and `engine.batches_in_flight`
  batches per engine; a row's answer starts as soon as its own thoughts end.
- runner, engines up: the same, with the engines already started when the clock starts, as for
  every generation pass of a run after its first on the same model.

Columns: "seconds" is the whole call as a stage sees it (engine start included for the cold
rows); "steady" the time during which some batch was being generated. Ratios are generated
tokens per second against the ceiling's. Every path samples with the same per-row seeds, so
each makes the same tokens; the script says so when they differ.
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from dromedary_ray.config import PROJECT_ROOT, RunConfig, load_config
from dromedary_ray.data.schemas import PromptRow
from dromedary_ray.data.store import StageStore
from dromedary_ray.engines.base import done_future
from dromedary_ray.models import resolve_model
from dromedary_ray.runtime.generate import BatchResult, TaskSpec


class Lockstep:
    """An engine whose `submit` returns only once its whole list is done: a task driven through
    it runs each phase of a batch in lockstep, as the runner used to."""

    def __init__(self, engine: Any):
        self.engine, self.tokenizer = engine, engine.tokenizer
        self.max_model_len = engine.max_model_len

    def submit(self, prompts, sampling, seeds=None):
        return [done_future(g) for g in self.engine.generate(prompts, sampling, seeds)]

    def generate(self, prompts, sampling, seeds=None):
        return self.engine.generate(prompts, sampling, seeds)


class LockstepTask:
    """Any BatchTask, run in lockstep (see Lockstep)."""

    def __init__(self, tokenizer: Any, factory: Any, kwargs: dict[str, Any]):
        self.inner = factory(tokenizer=tokenizer, **kwargs)

    def process(self, engine: Any, batch: pa.Table) -> BatchResult:
        return self.inner.process(Lockstep(engine), batch)


@dataclass
class Figure:
    name: str
    tokens: int
    seconds: float
    steady: float | None = None  # runners: seconds with some batch in flight


def ceiling(model: str, cfg: RunConfig, spec: TaskSpec, rows: pa.Table) -> Figure:
    from dromedary_ray.engines.vllm_engine import VLLMEngine

    engine = VLLMEngine(model, cfg.engine)
    task = LockstepTask(engine.tokenizer, spec.factory, spec.kwargs)
    start = time.perf_counter()
    result = task.process(engine, rows)
    seconds = time.perf_counter() - start
    engine.close()
    del engine, task
    gc.collect()
    return Figure("ceiling: direct, one call", result.completion_tokens, seconds)


def runner(name: str, model: str, cfg: RunConfig, spec: TaskSpec, rows: pa.Table,
           in_flight: int, batch_size: int, warm: bool = False) -> Figure:
    """One pass through run_generation on fresh engines; `warm`: the engines are started (and
    waited for) before the clock starts, as for every pass after a run's first on a model."""
    import dataclasses

    import ray

    from dromedary_ray.runtime.cluster import connect
    from dromedary_ray.runtime.generate import Engines, run_generation
    from dromedary_ray.stages.self_align import busy_seconds

    connect(cfg.ray)  # after the ceiling, which runs with no Ray daemons beside it
    engine_cfg = dataclasses.replace(cfg.engine, batches_in_flight=in_flight,
                                     batch_size=batch_size)
    with tempfile.TemporaryDirectory() as tmp, Engines() as engines:
        if warm:
            ray.get([a.ready.remote() for a in engines.pool(model, engine_cfg).actors])
        start = time.perf_counter()
        summaries = run_generation(rows, store=StageStore(tmp, "bench"), model_path=model,
                                   engine_cfg=engine_cfg, task=spec, engines=engines, desc=name)
        seconds = time.perf_counter() - start
    steady = busy_seconds([(s.started, s.seconds) for s in summaries])
    return Figure(name, sum(s.completion_tokens for s in summaries), seconds, steady)


def self_align_work(cfg: RunConfig, n: int) -> tuple[TaskSpec, pa.Table]:
    from dromedary_ray.principles import load_seed_tasks
    from dromedary_ray.stages.self_align import SelfAlignTask, stage_principles

    seeds = load_seed_tasks(cfg.seeds.file)[:n]
    rows = PromptRow.to_table([PromptRow(t.id, "seed", t.query) for t in seeds])
    spec = TaskSpec(SelfAlignTask, {"cfg": cfg.self_align,
                                    "principles": stage_principles(cfg.self_align)})
    return spec, rows


def synthesize_work(cfg: RunConfig) -> tuple[TaskSpec, pa.Table]:
    from dromedary_ray.data.synth_schemas import RequestRow
    from dromedary_ray.red_team import load_red_team_types
    from dromedary_ray.stages.synthesize import SynthesisPlan, SynthesisTask, seed_examples

    s = cfg.synthesize
    types = load_red_team_types(s.red_team.types_file)
    requests = SynthesisPlan(s, seed_examples(s.seed_file), types).plan_round(1)
    spec = TaskSpec(SynthesisTask, {"types": types,
                                    "self_instruct_sampling": s.self_instruct.sampling,
                                    "red_team_sampling": s.red_team.sampling})
    return spec, RequestRow.to_table(requests)


def compare(title: str, model: str, cfg: RunConfig, spec: TaskSpec, rows: pa.Table,
            old_batch: int) -> None:
    lockstep = TaskSpec(LockstepTask, {"factory": spec.factory, "kwargs": spec.kwargs})
    eng = cfg.engine
    figures = [
        ceiling(model, cfg, spec, rows),
        runner(f"runner as it was ({old_batch}x1)", model, cfg, lockstep, rows, 1, old_batch),
        runner(f"runner ({eng.batch_size}x{eng.batches_in_flight})", model, cfg, spec, rows,
               eng.batches_in_flight, eng.batch_size),
        runner("runner, engines up", model, cfg, spec, rows, eng.batches_in_flight,
               eng.batch_size, warm=True),
    ]
    base = figures[0].tokens / figures[0].seconds
    print(f"\n{title}: {rows.num_rows} rows, {eng.num_engines} engine(s); runner rows are "
          "(rows per batch)x(batches in flight per engine)")
    print(f"{'path':<30}{'tokens':>8}{'seconds':>9}{'tok/s':>8}{'vs ceiling':>12}"
          f"{'steady s':>10}{'steady tok/s':>14}{'vs ceiling':>12}")
    for f in figures:
        rate = f.tokens / f.seconds
        line = f"{f.name:<30}{f.tokens:>8}{f.seconds:>9.1f}{rate:>8.1f}{rate / base:>11.2f}x"
        if f.steady:
            steady = f.tokens / f.steady
            line += f"{f.steady:>10.1f}{steady:>14.1f}{steady / base:>11.2f}x"
        print(line, flush=True)
    if len({f.tokens for f in figures}) != 1:
        print("  note: the paths made different token counts; the ratios compare unlike work")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(PROJECT_ROOT / "configs/local.yaml"))
    ap.add_argument("--prompts", type=int, default=205, help="seed prompts for self_align")
    ap.add_argument("--skip", nargs="*", default=[], choices=["self_align", "synthesize"])
    ap.add_argument("--old-batch-size", type=int, default=32,
                    help="rows per batch of the runner as it was (the old embedded default)")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides, as `dromedary run`")
    args = ap.parse_args()

    cfg = load_config(args.config, args.overrides)
    model = resolve_model(cfg.model)
    if "self_align" not in args.skip:
        compare("self_align (the main job)", model, cfg, *self_align_work(cfg, args.prompts),
                old_batch=args.old_batch_size)
    if "synthesize" not in args.skip:
        compare("synthesize, round 1", model, cfg, *synthesize_work(cfg),
                old_batch=args.old_batch_size)


if __name__ == "__main__":
    main()
