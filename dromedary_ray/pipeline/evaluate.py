"""Automatic evaluation: every model a run makes is scored right after the stage that made it.

With `evaluate.suites` set, the driver scores the starting model ("base") before the first stage
and each stage's model after the stage (labelled by the stage; I-SHEEP's by iteration), with the
`dromedary eval` suites, into `<run>/eval/<label>/<suite>.json` where the run report finds them.
A result records the fingerprint of what made the model, so a rerun scores only models that
changed. Each evaluation runs as a Ray task holding one engine's CPUs and GPUs, so on a cluster
it lands on a GPU node, not the (CPU-only) head. The driver waits at most `evaluate.timeout_s`
for it: past that the task is cancelled (its worker killed, freeing the engine's CPUs and GPUs)
and the run fails naming the model and the suite, rather than waiting on a hung engine for ever.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from dromedary_ray.config import RunConfig
from dromedary_ray.errors import StageError
from dromedary_ray.runtime.faults import maybe_hang

if TYPE_CHECKING:
    from dromedary_ray.eval import EvalOptions

log = logging.getLogger(__name__)


def result_path(config: RunConfig, label: str, suite: str) -> Path:
    return Path(config.run_dir) / "eval" / label / f"{suite}.json"


def evaluate_model(config: RunConfig, spec: str, label: str, made_by: str) -> list[str]:
    """Score `spec` on every configured suite not already scored for the same `made_by`."""
    from dromedary_ray.eval import EvalOptions, save_result

    cfg = config.evaluate
    written: list[str] = []
    for suite in cfg.suites:
        path = result_path(config, label, suite)
        if path.exists() and json.loads(path.read_text()).get("made_by") == made_by:
            continue
        opts = EvalOptions(model=spec, suite=suite, data=cfg.data(suite), backend=cfg.backend,
                           run_dir=config.run_dir, max_new_tokens=cfg.max_new_tokens,
                           max_model_len=cfg.max_model_len, limit=cfg.limit)
        log.info("evaluating %s (%s) on %s", label, spec, suite)
        result = {**_run_remote(config, opts, label), "label": label, "made_by": made_by}
        written += save_result(result, dataclasses.replace(opts, model=label), None)
    return written


def _run_remote(config: RunConfig, opts: EvalOptions, label: str) -> dict:
    import ray

    from dromedary_ray.runtime.cluster import connect
    from dromedary_ray.runtime.train_common import passed_env

    connect(config.ray)
    engine, seconds = config.engine, config.evaluate.timeout_s
    options: dict = {"num_cpus": engine.cpus_per_engine, "num_gpus": engine.gpus_per_engine or None}
    env = passed_env()  # the model cache (and a fault test's spec) for a cluster we joined
    if env:
        options["runtime_env"] = {"env_vars": env}
    ref = ray.remote(**options)(_eval_task).remote(opts)
    try:
        return ray.get(ref, timeout=seconds)
    except ray.exceptions.GetTimeoutError:
        # force: a hung engine never returns to the task, so only killing its worker frees
        # the CPUs and GPUs it holds for the stages after this one.
        ray.cancel(ref, force=True)
        raise StageError(
            f"evaluating {label} ({opts.model}) on suite {opts.suite} did not finish within "
            f"evaluate.timeout_s = {seconds:g} s; the task was cancelled. Raise "
            "evaluate.timeout_s if the suite is legitimately slower (or set evaluate.limit "
            "to score fewer items); a rerun skips the stages already done") from None


def _eval_task(opts: EvalOptions) -> dict:
    """`run_eval` in a Ray task, behind a hang point for the fault tests."""
    from dromedary_ray.eval import run_eval

    maybe_hang("eval_task")
    return run_eval(opts)


def stage_model(config: RunConfig, name: str) -> str | None:
    """The spec of the model stage `name` saved, or None if it saves none."""
    folder = Path(config.run_dir) / name / "model"
    return f"run:{name}" if (folder / "config.json").exists() else None
