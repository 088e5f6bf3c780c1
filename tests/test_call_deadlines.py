"""Deadlines on long calls: PPO's waits on its actors (`runtime/ppo/loop.py::within`) and the
automatic evaluation's wait on its task (`pipeline/evaluate.py`). On a local Ray with stand-in
actors and the DROMEDARY_HANG hook: seconds each, no engine starts."""

from __future__ import annotations

import os
import time

import pytest

from dromedary_ray.config import PROJECT_ROOT, PPOConfig, load_config
from dromedary_ray.errors import ConfigError, StageError


class Sleeper:
    """Stands in for a PPO actor: answers after `seconds`, or dies."""

    def nap(self, seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    def die(self) -> None:
        os._exit(1)

    def pid(self) -> int:
        return os.getpid()


def sleepers(n: int) -> tuple[list, list[int]]:
    """`n` started stand-ins and their pids (started first, as `start_actors` waits for its
    actors: a worker's start-up is not what the deadline is for)."""
    import sys

    import ray
    from ray import cloudpickle

    # Ray's workers cannot import this test module: send the class itself.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    handles = [ray.remote(Sleeper).options(num_cpus=0).remote() for _ in range(n)]
    return handles, ray.get([h.pid.remote() for h in handles])


def wait_until(predicate, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return predicate()


@pytest.mark.slow
def test_ppo_waits_end_at_the_deadline_naming_the_late_actor(ray_local):
    import psutil
    import ray

    from dromedary_ray.runtime.ppo.loop import (
        Actors,
        ActorTimeoutError,
        CallTimedOut,
        actor_deaths,
        stop_actors,
        within,
    )

    (r0, r1, rm, tr), (_, hung_pid, _, _) = sleepers(4)
    actors = Actors([r0, r1], rm, tr)
    cfg = PPOConfig(call_timeout_s=1.0)
    try:
        assert within(actors, [r0.nap.remote(0), r1.nap.remote(0.2)], [r0, r1], cfg,
                      "call_timeout_s") == [0, 0.2]
        started = time.monotonic()
        with pytest.raises(ActorTimeoutError, match=r"^stage ppo: the rollout 1 actor did not "
                           r"answer within ppo.call_timeout_s = 1 s during step 5"):
            with actor_deaths(actors, 5, 4):
                within(actors, [r0.nap.remote(0), r1.nap.remote(600)], [r0, r1], cfg,
                       "call_timeout_s")
        assert time.monotonic() - started < 10
        # A peer's death is the cause, not the wait on a late one: it is reported as such.
        with pytest.raises(ray.exceptions.RayActorError):
            within(actors, [rm.die.remote(), tr.nap.remote(600)], [rm, tr], cfg,
                   "call_timeout_s")
        with pytest.raises(CallTimedOut, match="the trainer actor"):  # its own deadline
            within(actors, [tr.nap.remote(600)], [tr], PPOConfig(update_timeout_s=0.5),
                   "update_timeout_s")
    finally:
        stop_actors(actors)
    # The actor given up on does not sleep on in its call: its process ends.
    assert wait_until(lambda: not psutil.pid_exists(hung_pid), 30)


def test_evaluate_timeout_must_be_positive():
    for bad in ("0", ".inf"):
        with pytest.raises(ConfigError, match=r"^evaluate\.timeout_s: must be > 0 and finite"):
            load_config(None, [f"evaluate.timeout_s={bad}"])
    assert load_config(None, []).evaluate.timeout_s >= 3600  # whole suites on a CPU engine


@pytest.mark.slow
def test_hung_evaluation_is_cancelled_and_names_model_suite_and_setting(ray_local, tiny_model,
                                                                        tmp_path, monkeypatch):
    import ray

    from dromedary_ray.pipeline.evaluate import evaluate_model, result_path

    monkeypatch.setenv("DROMEDARY_HANG", "eval_task:600")  # the task never starts its suite
    config = load_config(PROJECT_ROOT / "configs/local.yaml", [
        f"run_dir={tmp_path / 'run'}", "evaluate.suites=[ifeval]", "evaluate.timeout_s=3",
        "evaluate.backend=transformers", "engine.cpus_per_engine=1"])
    free = ray.available_resources().get("CPU", 0)
    started = time.monotonic()
    with pytest.raises(StageError) as err:
        evaluate_model(config, tiny_model, "base", made_by="base:tiny")
    assert str(err.value).startswith(
        f"evaluating base ({tiny_model}) on suite ifeval did not finish within "
        "evaluate.timeout_s = 3 s; the task was cancelled")
    assert time.monotonic() - started < 30  # the limit plus a worker start, not 600 s
    assert not result_path(config, "base", "ifeval").exists()
    # Cancelled for real: the hung task's CPU comes back for the stages after it.
    assert wait_until(lambda: ray.available_resources().get("CPU", 0) >= free, 30)
