"""One run at a time per run directory: a second process is refused with an error naming the
holder and the lock file; a killed holder leaves no stale lock; nested runs in one process
(I-SHEEP's iterations) do not deadlock."""

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from dromedary_ray import cli
from dromedary_ray.config import PROJECT_ROOT, load_config
from dromedary_ray.data.run_lock import run_lock
from dromedary_ray.errors import RunLockedError

CONFIG = str(PROJECT_ROOT / "configs/local.yaml")
HOLDER = """
import sys, time
from dromedary_ray.data.run_lock import run_lock
with run_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(600)
"""


@pytest.fixture
def holder(tmp_path: Path):
    """Another process holding the run directory's lock; SIGKILLed at the end if still up."""
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "locked"
    yield run, proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def test_second_process_is_refused_naming_the_holder(holder):
    run, proc = holder
    with pytest.raises(RunLockedError) as caught, run_lock(str(run)):
        pass
    message = str(caught.value)
    assert f"pid {proc.pid} on host {socket.gethostname()} since 20" in message
    assert f"lock file {run / '.lock'}" in message and " UTC" in message
    assert "has exited" not in message


def test_killed_holder_leaves_no_stale_lock(holder):
    """The kernel drops an flock with its process, even one SIGKILLed mid-run."""
    run, proc = holder
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with run_lock(str(run)) as lock:
        assert lock == run / ".lock"
        assert json.loads(lock.read_text())["pid"] == os.getpid()


def test_cli_run_exits_2_naming_the_holder(holder, monkeypatch, capsys):
    """The second `dromedary run` stops before it reads or writes anything of the run."""
    run, proc = holder

    def went_on(config):
        raise AssertionError("the run went on past the lock")

    monkeypatch.setattr("dromedary_ray.pipeline.driver.check_stages", went_on)
    monkeypatch.setattr("dromedary_ray.pipeline.driver._write_resolved_config", went_on)
    rc = cli.main(["run", CONFIG, "--run-dir", str(run), "recipe=seeds_only"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"error: run directory {run} is in use by another run: ")
    assert f"pid {proc.pid}" in err and str(run / ".lock") in err and err.count("\n") == 1
    assert not (run / "config.yaml").exists()


def test_nested_runs_in_one_process_do_not_deadlock(tmp_path: Path, monkeypatch):
    """I-SHEEP runs each iteration with run_pipeline inside the outer run_pipeline: the outer
    run's lock covers it, in its own `<run>/isheep/iter_<k>/` and in the run itself."""
    from dromedary_ray.pipeline import driver, isheep

    run = tmp_path / "run"
    inner_dirs = [run / "isheep" / "iter_1", run]

    def fake_isheep(config):
        reports = []
        for inner in inner_dirs:
            reports += driver.run_pipeline(load_config(CONFIG, [f"run_dir={inner}",
                                                                "recipe=seeds_only"]))
        return reports

    monkeypatch.setattr(isheep, "run_isheep", fake_isheep)
    reports = driver.run_pipeline(load_config(CONFIG, [f"run_dir={run}", "recipe=isheep"]))
    assert [r.status for r in reports] == ["ran", "ran"]
    # Both locks are released at the end: another holder gets them at once.
    for folder in (run, run / "isheep" / "iter_1"):
        with open(folder / ".lock") as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_holder_that_exited_while_a_forked_child_keeps_the_lock(tmp_path: Path):
    """Only a child forked without exec can hold the lock past its run: the error says so."""
    run = tmp_path / "run"
    run.mkdir()
    lock = run / ".lock"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "since": 0}))
    with open(lock) as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another open file: as a forked child
        with pytest.raises(RunLockedError, match=f"pid {dead.pid} has exited, but a process "
                                                 "it forked still holds"), run_lock(str(run)):
            pass


def test_object_store_run_dir_takes_no_lock_and_says_so(caplog):
    with caplog.at_level("WARNING"), run_lock("s3://bucket/runs/a") as lock:
        assert lock is None
    assert "no file locks" in caplog.text and "s3://bucket/runs/a" in caplog.text
