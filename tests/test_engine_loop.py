"""The step loop and the future helpers, on a scripted stand-in for vLLM's LLMEngine (the loop's
scheduling is under test here; tests/test_streaming.py runs it on real vLLM)."""

import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

import pytest

from dromedary_ray.engines.base import done_future, finished_groups
from dromedary_ray.engines.loop import EngineLoopError, StepLoop
from dromedary_ray.stages.self_align import busy_seconds


@dataclass
class Out:
    request_id: str
    finished: bool
    text: str


class ScriptedEngine:
    """Each request takes `params` steps; records which requests every step worked on."""

    def __init__(self, fail_at_step: int | None = None):
        self.running: dict[str, list] = {}  # id -> [steps left, prompt]
        self.steps: list[set[str]] = []
        self.fail_at_step = fail_at_step
        self.step_started = threading.Event()

    def add_request(self, rid, prompt, params, lora_request=None):
        if prompt == "bad":
            raise ValueError("bad prompt")
        self.running[rid] = [params, prompt]
        return rid

    def has_unfinished_requests(self):
        return bool(self.running)

    def step(self):
        self.step_started.set()
        if self.fail_at_step is not None and len(self.steps) == self.fail_at_step:
            raise RuntimeError("engine core died")
        time.sleep(0.01)
        self.steps.append(set(self.running))
        outs = []
        for rid, state in list(self.running.items()):
            state[0] -= 1
            if state[0] == 0:
                del self.running[rid]
                outs.append(Out(rid, True, state[1].upper()))
        return outs


def test_submit_returns_at_once_and_resolves_each_request_when_it_ends():
    engine = ScriptedEngine()
    loop = StepLoop(engine)
    slow, fast = loop.submit("slow", 20, lambda o: o.text), loop.submit("fast", 2)
    assert not slow.done()
    assert fast.result(timeout=5).text == "FAST"
    assert not slow.done()  # each request ends on its own, not with its group
    assert slow.result(timeout=5) == "SLOW"
    loop.close()


def test_a_request_submitted_mid_run_joins_the_running_batch():
    engine = ScriptedEngine()
    loop = StepLoop(engine)
    first = loop.submit("first", 30)
    engine.step_started.wait(5)
    second = loop.submit("second", 3)  # arrives while `first` is being decoded
    second.result(timeout=5)
    assert not first.done()  # it did not wait for `first` to end
    first.result(timeout=5)
    shared = [s for s in engine.steps if len(s) == 2]
    assert len(shared) == 3  # every step of `second` also worked on `first`
    loop.close()


def test_a_bad_request_fails_alone():
    loop = StepLoop(ScriptedEngine())
    bad, good = loop.submit("bad", 1), loop.submit("ok", 2)
    with pytest.raises(ValueError, match="bad prompt"):
        bad.result(timeout=5)
    assert good.result(timeout=5).text == "OK"
    loop.close()


def test_an_engine_failure_fails_every_waiting_request_and_later_submits():
    loop = StepLoop(ScriptedEngine(fail_at_step=3))
    futures = [loop.submit(f"r{i}", 10) for i in range(3)]
    for f in futures:
        with pytest.raises(EngineLoopError, match="engine core died"):
            f.result(timeout=5)
    with pytest.raises(EngineLoopError, match="has ended"):
        loop.submit("late", 1)


def test_close_fails_what_is_still_pending():
    engine = ScriptedEngine()
    loop = StepLoop(engine)
    pending = loop.submit("long", 10_000)
    engine.step_started.wait(5)
    loop.close()
    with pytest.raises(EngineLoopError, match="closed"):
        pending.result(timeout=5)


def test_finished_groups_yield_results_as_they_finish_with_their_index():
    futures: list[Future] = [Future() for _ in range(4)]
    futures[2].set_result("c")
    groups = finished_groups(futures)
    assert next(groups) == [(2, "c")]  # the others are still running
    futures[0].set_result("a")
    futures[3].set_result("d")
    assert next(groups) == [(0, "a"), (3, "d")]
    futures[1].set_result("b")
    assert next(groups) == [(1, "b")]
    assert list(groups) == []


def test_finished_groups_give_one_group_when_all_are_done():
    assert list(finished_groups([done_future(i) for i in range(3)])) == [
        [(0, 0), (1, 1), (2, 2)]]


@pytest.mark.parametrize(("spans", "busy"), [
    ([], 0.0),
    ([(0.0, 2.0), (5.0, 1.0)], 3.0),  # apart: the sum
    ([(0.0, 4.0), (1.0, 2.0)], 4.0),  # one inside the other
    ([(0.0, 2.0), (1.0, 2.0), (2.5, 1.0)], 3.5),  # overlapping chain
])
def test_busy_seconds_is_the_union_of_batch_spans(spans, busy):
    assert busy_seconds(spans) == pytest.approx(busy)
