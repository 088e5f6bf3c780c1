"""The fault-injection hooks themselves: the reliability tests rely on them firing exactly where
and when their spec says, and never otherwise."""

import time

from dromedary_ray.runtime import faults


def timed(point: str) -> float:
    t0 = time.perf_counter()
    faults.maybe_hang(point)
    return time.perf_counter() - t0


def test_hang_blocks_from_the_nth_call_of_its_point_only(monkeypatch):
    monkeypatch.setattr(faults, "_hangs", faults.Counter())
    monkeypatch.setenv(faults.HANG_ENV, "train_step:0.3:3")
    assert timed("train_step") < 0.1 and timed("train_step") < 0.1  # calls 1 and 2 run on
    assert timed("engine_call") < 0.1  # another point never blocks
    assert timed("train_step") >= 0.3 and timed("train_step") >= 0.3  # call 3 on: held


def test_hang_without_a_count_blocks_every_call(monkeypatch):
    monkeypatch.setattr(faults, "_hangs", faults.Counter())
    monkeypatch.setenv(faults.HANG_ENV, "engine_call:0.2")
    assert timed("engine_call") >= 0.2


def test_die_spares_the_calls_before_the_nth_and_a_run_whose_marker_exists(monkeypatch, tmp_path):
    monkeypatch.setattr(faults, "_hits", faults.Counter())
    marker = tmp_path / "fired"
    monkeypatch.setenv(faults.ENV, f"train_step:5:{marker}")
    for _ in range(4):
        faults.maybe_die("train_step")  # would SIGKILL this very test process if it fired
    marker.write_text("an earlier run fired it\n")
    faults.maybe_die("train_step")  # the 5th call, but the marker says it already fired once
    assert marker.read_text() == "an earlier run fired it\n"


def test_children_inherit_no_fault_spec():
    env = {"PATH": "/bin", faults.ENV: "train_step:1:/tmp/m", faults.HANG_ENV: "engine_call:9"}
    assert faults.without_faults(env) == {"PATH": "/bin"}
