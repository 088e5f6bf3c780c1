"""Helpers of the fault-injection suite: the tiny settings, the processes it runs, and the
comparisons of a faulted run's tables with an uninterrupted one's.

Every case runs the real thing: `dromedary run` (or the engrave driver) in its own process, real
Ray, vLLM engines and Ray Train workers on the tiny model; faults are real SIGKILLs (the
`DROMEDARY_FAULT` hook or `os.kill` from the test).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

from dromedary_ray.config import PROJECT_ROOT
from dromedary_ray.runtime.faults import without_faults

HERE = Path(__file__).parent
CONFIG = str(PROJECT_ROOT / "configs/local.yaml")
N_PROMPTS = 24
# seeds -> self_align on one engine: 6 batches of 4 rows, 6 shards, 2 batches in flight (so a
# driver killed after its 3rd shard leaves at least one batch never started: a real mid-stage kill)
GENERATION = [
    "model=builtin:tiny-llama", f"seeds.max_prompts={N_PROMPTS}", "engine.batch_size=4",
    "engine.num_engines=1", "engine.batches_in_flight=2", "engine.max_model_len=3072",
    "engine.kv_cache_gib=1", "engine.cpus_per_engine=1", "self_align.sampling.max_new_tokens=16",
]
STEPS, EVERY = 20, 5  # engrave: 20 optimizer steps, a checkpoint every 5
TRAINING = [
    "model=builtin:tiny-llama", "ray.num_cpus=4", "engrave.train.num_workers=2",
    "engrave.train.zero_stage=3", "engrave.train.learning_rate=0.001",
    "engrave.train.warmup_ratio=0.0", "engrave.train.micro_batch_size=2",
    "engrave.train.epochs=10", f"engrave.train.max_steps={STEPS}",
    f"engrave.train.checkpoint_every_steps={EVERY}", "engrave.train.max_seq_len=64",
    "engrave.train.log_every_steps=100",
]


def env_with(**extra: str) -> dict[str, str]:
    env = without_faults(dict(os.environ))
    env["PYTHONUNBUFFERED"] = "1"
    return {**env, **extra}


def dromedary_run(run_dir: Path, *extra: str, env: dict[str, str] | None = None,
                  timeout: int = 600) -> subprocess.CompletedProcess:
    """`dromedary run` of the generation recipe, in a fresh process as a user runs it."""
    cmd = [sys.executable, "-m", "dromedary_ray.cli", "run", CONFIG, "--run-dir", str(run_dir),
           *GENERATION, *extra]
    # Its own session, so that every process the run started (Ray's raylet and workers, vLLM's
    # engine cores) can be found, and waited for, by session id once the driver has ended.
    proc = subprocess.Popen(cmd, env=env or env_with(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    # A SIGKILLed driver's workers outlive it for a moment, and one of them may still commit a
    # shard it had finished: count what is on disk only after they are gone.
    wait_for_session_exit(proc.pid, 120)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def wait_for_session_exit(sid: int, timeout: float) -> None:
    """Wait until every process of session `sid` (bar Ray's agents) has ended; past `timeout`,
    fail naming those left (pid, state, age, command line), after killing them so that they
    do not outlive the test."""
    try:
        wait_for(lambda: not session_processes(sid), timeout, "the run's processes to exit")
    except AssertionError as err:
        left = session_processes(sid)
        listing = subprocess.run(["ps", "-o", "pid=,stat=,etime=,args=", "-p",
                                  ",".join(map(str, left)) or "0"],
                                 capture_output=True, text=True).stdout
        for pid in left:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        raise AssertionError(f"{err}; still running:\n{listing}") from None


RAY_AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")


def session_processes(sid: int, agents: bool = False) -> set[int]:
    """The live processes of session `sid` (a run started with start_new_session=True). Ray's
    dashboard and runtime-env agents, which outlive a killed driver by about a minute (their GCS
    reconnect timeout) but write nothing of ours, are counted only if `agents`."""
    out = subprocess.run(["ps", "-eo", "pid=,sid=,stat=,args="], capture_output=True, text=True)
    rows = (line.split(None, 3) for line in out.stdout.splitlines())
    return {int(pid) for pid, s, stat, *args in rows
            if int(s) == sid and not stat.startswith("Z")
            and (agents or not (args and args[0].startswith(RAY_AGENTS)))}


def engrave_cmd(run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, str(HERE / "engrave_driver.py"), str(run_dir), *TRAINING, *extra]


def engrave_run(run_dir: Path, env: dict[str, str] | None = None) -> dict:
    """The engrave driver to the end; its stage report."""
    out = subprocess.run(engrave_cmd(run_dir), env=env or env_with(), capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    (line,) = [x for x in out.stdout.splitlines() if x.startswith("ENGRAVE-REPORT ")]
    return json.loads(line.removeprefix("ENGRAVE-REPORT "))


def raw_ids(folder: Path) -> list[str]:
    """Every id in every finished file of a table folder, read as a plain Parquet dataset (as a
    user would): repeats are not hidden by the store's first-shard-wins reader."""
    if not folder.exists() or not any(folder.glob("*.parquet")):
        return []
    return pq.read_table(folder, columns=["id"])["id"].to_pylist()


def rows_by_id(folder: Path) -> dict[str, dict]:
    rows = pq.read_table(folder).to_pylist() if any(folder.glob("*.parquet")) else []
    return {r["id"]: r for r in rows}


def assert_tables_equal_reference(run_dir: Path, reference: Path, stage: str,
                                  expected_rows: int) -> None:
    """Same row ids as the uninterrupted run, none twice, none lost, and the same content."""
    kept = raw_ids(run_dir / stage / "data")
    dropped = raw_ids(run_dir / stage / "rejects")
    everything = kept + dropped
    assert len(everything) == len(set(everything)), "a row was written twice"
    assert len(everything) == expected_rows, f"{expected_rows - len(everything)} rows lost"
    for table in ("data", "rejects"):
        got, want = rows_by_id(run_dir / stage / table), rows_by_id(reference / stage / table)
        assert sorted(got) == sorted(want), f"{table}: other row ids than the reference"
        assert got == want, f"{table}: same ids, other content than the reference"


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process ended (rc {proc.returncode}) before {what}")
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def logged_steps(path: Path) -> list[int]:
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return [json.loads(line)["step"] for line in lines]


def orphaned_engines() -> set[int]:
    """vLLM processes whose parent died (re-parented to init): leaked CPU eaters."""
    out = subprocess.run(["ps", "-eo", "pid=,ppid=,comm="], capture_output=True, text=True)
    return {int(pid) for pid, ppid, comm in (line.split(None, 2) for line in
                                             out.stdout.splitlines())
            if ppid == "1" and comm.startswith("VLLM")}
