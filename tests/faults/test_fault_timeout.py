"""A hung engine call fails its stage with a clear error naming the stage and the limit, within
the limit, instead of hanging the run."""

import json
import time

import pytest
from fault_helpers import dromedary_run, env_with

from dromedary_ray.config import ConfigError, EngineConfig
from dromedary_ray.engines.timeout import BatchDeadline, EngineTimeoutError


class SlowTask:
    """Stands in for a stage task on vLLM (not under test here): its batch takes `delay` s."""

    def __init__(self, delay: float):
        self.delay, self.calls = delay, 0

    def process(self, rows: list[str]) -> list[str]:
        self.calls += 1
        time.sleep(self.delay)
        return [r.upper() for r in rows]


def test_work_within_the_limit_passes_through():
    deadline, task = BatchDeadline(5.0), SlowTask(0.01)
    assert deadline.run(lambda: task.process(["a", "b"]), 2, "self_align") == ["A", "B"]
    assert not deadline.broken
    deadline.close()


def test_hung_call_raises_naming_stage_and_limit_then_fails_fast():
    deadline, task = BatchDeadline(0.5), SlowTask(30.0)
    start = time.monotonic()
    with pytest.raises(EngineTimeoutError, match=r"stage self_align: .*call_timeout_s = 0.5 s"):
        deadline.run(lambda: task.process(["a"]), 1, "self_align")
    assert time.monotonic() - start < 2.0 and deadline.broken
    # The stuck call still holds the engine: a second call must not queue behind it.
    start = time.monotonic()
    with pytest.raises(EngineTimeoutError):
        deadline.run(lambda: task.process(["b"]), 1, "self_align")
    assert time.monotonic() - start < 0.1 and task.calls == 1
    deadline.close()  # returns at once, though the call is stuck


def test_timeout_must_be_positive():
    with pytest.raises(ConfigError, match="call_timeout_s"):
        EngineConfig(call_timeout_s=0)


@pytest.mark.slow
def test_hung_engine_fails_the_run_with_a_clear_error(tmp_path):
    """A real run whose vLLM call hangs (the DROMEDARY_HANG hook): the CLI ends with our
    one-line error, exit 2, long before the hang would have ended."""
    run_dir = tmp_path / "run"
    start = time.monotonic()
    out = dromedary_run(run_dir, "engine.call_timeout_s=20",
                        env=env_with(DROMEDARY_HANG="engine_call:3600"), timeout=400)
    elapsed = time.monotonic() - start
    assert out.returncode == 2, out.stderr[-3000:]
    assert ("error: stage self_align: an engine call on 4 prompts did not return within "
            "engine.call_timeout_s = 20 s") in out.stderr
    assert elapsed < 300, elapsed  # engine start-up + 20 s, not the hour of the hang
    manifest = json.loads((run_dir / "self_align/manifest.json").read_text())
    assert manifest["status"] == "running"  # failed, resumable; never marked done
