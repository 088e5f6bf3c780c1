"""A training stage (engrave: Ray Train + DeepSpeed ZeRO-3, two workers) under faults: a worker
SIGKILLed mid-training, the driver SIGKILLed mid-training. Each resumes from the last
checkpoint, not from step 0, and ends with the uninterrupted run's losses and weights."""

import json
import os
import signal
import subprocess

import pytest
import torch
from fault_helpers import (
    EVERY,
    STEPS,
    engrave_cmd,
    engrave_run,
    env_with,
    logged_steps,
    session_processes,
    wait_for,
    wait_for_session_exit,
)

pytestmark = pytest.mark.slow


def curve(run_dir) -> list[tuple[int, float]]:
    lines = (run_dir / "engrave/loss_curve.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines)]


def weights(run_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    (path,) = (run_dir / "engrave/model").glob("*.safetensors")
    return load_file(path)


def assert_same_training(run_dir, reference) -> None:
    """Same data order and restored optimizer state: the losses and the final weights of the
    run never interrupted."""
    got, want = curve(run_dir), curve(reference)
    assert [s for s, _ in got] == list(range(1, STEPS + 1))
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-5)
    w_got, w_want = weights(run_dir), weights(reference)
    assert w_got.keys() == w_want.keys()
    for name in w_want:
        torch.testing.assert_close(w_got[name], w_want[name], rtol=1e-4, atol=1e-5)


def test_reference_training_learned(training_reference):
    _, report = training_reference
    m = report["metrics"]
    assert m["steps"] == STEPS and m["resumed_from_step"] == 0
    assert m["final_loss"] < m["first_loss"] - 1.0, m


def test_train_worker_killed_mid_training_resumes_from_checkpoint(training_reference, tmp_path):
    """Rank 0 dies right after logging step 12; the last checkpoint is step 10."""
    reference, _ = training_reference
    marker, run_dir = tmp_path / "fired", tmp_path / "run"
    report = engrave_run(run_dir, env=env_with(DROMEDARY_FAULT=f"train_step:12:{marker}"))
    assert marker.exists(), "the fault hook never fired: the case proved nothing"
    assert report["status"] == "ran"
    assert report["metrics"]["resumed_from_step"] == 10
    # Steps 11 and 12 ran twice (before the kill, after the restore); nothing before 11 did.
    steps = logged_steps(run_dir / "engrave/train_log.jsonl")
    assert steps == [*range(1, 13), *range(11, STEPS + 1)]
    assert_same_training(run_dir, reference)


def test_driver_sigkilled_mid_training_resumes_from_checkpoint(training_reference, tmp_path):
    """SIGKILL the driver once step 12 is logged (checkpoint 10 committed), run it again.

    Rank 0 is held still after logging step 12: the train workers outlive the killed driver by
    a second or two, and unheld they could finish all 20 steps in that time (it happened in CI).
    """
    reference, _ = training_reference
    run_dir = tmp_path / "run"
    log = run_dir / "engrave/train_log.jsonl"
    proc = subprocess.Popen(engrave_cmd(run_dir), env=env_with(DROMEDARY_HANG="train_step:600:12"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        wait_for(lambda: max(logged_steps(log), default=0) >= 12, 600, "step 12", proc)
        os.kill(proc.pid, signal.SIGKILL)  # the driver only: its Ray cluster must follow
        assert proc.wait(timeout=60) == -signal.SIGKILL
        # A local Ray cluster shares its driver's fate: no raylet, GCS, controller or train
        # worker of the killed run lives on to eat the cores the resumed run needs.
        wait_for_session_exit(proc.pid, 30)
    finally:
        # Ray's two per-node agents wait out their GCS reconnect timeout (~60 s) before they
        # notice; they hold memory, not cores. They are this test's: end them now.
        for pid in session_processes(proc.pid, agents=True):
            os.kill(pid, signal.SIGKILL)
    killed_at = max(logged_steps(log))
    assert killed_at == 12 and not (run_dir / "engrave/model/config.json").exists()
    report = engrave_run(run_dir)
    assert report["status"] == "ran"
    resumed = report["metrics"]["resumed_from_step"]
    # From the last checkpoint before the kill: not from zero, and nothing checkpointed lost.
    assert resumed % EVERY == 0 and 10 <= resumed <= killed_at, (resumed, killed_at)
    assert_same_training(run_dir, reference)
