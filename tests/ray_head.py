"""A throwaway Ray cluster for the tests that need a real one (`ray start`, `ray job submit`),
shared by test_job_submit.py and test_autoscale.py.

The head runs with `--block` in a process group of its own, so the test stops exactly the
processes it started (never `ray stop`, which would take down every Ray cluster on the machine,
other people's included).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from dromedary_ray.config import PROJECT_ROOT
from dromedary_ray.runtime.cluster import free_port

BIN = Path(sys.executable).parent
# What `ray job submit --working-dir` leaves out: the environment, runs and data files.
JOB_EXCLUDES = '{"excludes": [".venv", "runs", ".git", "*.parquet"]}'


@dataclass(frozen=True)
class Head:
    gcs: str  # 127.0.0.1:PORT, for ray.init
    dashboard: str  # http://127.0.0.1:PORT, for the job API
    env: dict[str, str]  # the head's environment; clients start from it


def head_env(**extra: str) -> dict[str, str]:
    """This venv's `ray` and `python` first on PATH (the job's `python` is the head's), Ray on
    loopback only."""
    return {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", **extra}


@contextmanager
def ray_head(*args: str, gcs_port: int | None = None, env: dict[str, str] | None = None,
             log: Path | None = None) -> Iterator[Head]:
    """`ray start --head --block` on 127.0.0.1 with `args` added; stopped on exit, even when
    the body fails, together with every process it spawned (nodes an autoscaler launched
    included)."""
    gcs, dash = gcs_port or free_port(), free_port()
    env = env or head_env()
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         f"--dashboard-agent-listen-port={free_port()}", "--disable-usage-stats", *args],
        env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield Head(f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}", env)
    finally:
        stop_tree(proc)
        if log:
            out.close()


def stop_tree(proc: subprocess.Popen) -> None:
    """SIGTERM the head's process group, SIGKILL it 5 s later, then any descendant still
    running. Ray's own processes share the group, but a process that made a group of its own
    would escape `killpg`; the descendants are collected first, while the tree is connected."""
    import psutil

    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        # A graceful `ray start --block` shutdown took ~33 s in CI (twice per run, the autoscaling
        # and job tests); a test cluster has nothing to save, so it gets 5 s before SIGKILL.
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    _, alive = psutil.wait_procs(tree, timeout=15)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def submit(head: Head, run_dir: Path, overrides: list[str], *, upload: bool = True,
           timeout: int = 900) -> subprocess.CompletedProcess:
    """`ray job submit` of `dromedary run configs/local.yaml`, waiting for the job to end.

    `upload=False` sends no working dir: the job runs the project installed in this venv. The
    simulated cluster needs that (cluster/README.md says why).
    """
    if upload:
        job = ["--working-dir", str(PROJECT_ROOT), "--runtime-env-json", JOB_EXCLUDES, "--",
               "dromedary", "run", "configs/local.yaml"]
    else:
        job = ["--", "dromedary", "run", str(PROJECT_ROOT / "configs/local.yaml")]
    cmd = [str(BIN / "ray"), "job", "submit", "--address", head.dashboard, *job,
           "--run-dir", str(run_dir), *overrides]
    client_env = {**head.env, "RAY_AUTH_MODE": "token"}  # Ray 2.60 clusters require the token
    for _ in range(20):  # the dashboard agent takes a few seconds to register
        out = subprocess.run(cmd, env=client_env, capture_output=True, text=True,
                             timeout=timeout)
        if "No available agent" not in out.stderr + out.stdout and "Connection" not in \
                out.stderr[-500:]:
            return out
        time.sleep(5)
    return out
