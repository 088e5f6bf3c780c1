"""`ray job submit` for real: a head node started with `ray start` on 127.0.0.1, the tiny recipe
submitted as a job, and its outputs compared with a direct run of the same config."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dromedary_ray.config import PROJECT_ROOT, load_config
from dromedary_ray.data.schemas import RejectRow, SelfAlignRow
from dromedary_ray.data.store import StageStore
from dromedary_ray.pipeline.driver import run_pipeline

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
TINY = ["model=builtin:tiny-llama", "seeds.max_prompts=8", "engine.batch_size=4",
        "engine.cpus_per_engine=1", "engine.kv_cache_gib=1",
        "self_align.sampling.max_new_tokens=16"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def head_node(tmp_path):
    """A separate Ray cluster; `--block` ties its processes to ours, so we stop exactly it
    (never `ray stop`, which would take down every Ray cluster on the machine)."""
    gcs, dash, agent = free_port(), free_port(), free_port()
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         f"--dashboard-agent-listen-port={agent}", "--num-cpus=4", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        yield f"http://127.0.0.1:{dash}", env
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


def submit(address: str, env: dict, run_dir: Path) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir",
           str(PROJECT_ROOT), "--runtime-env-json",
           '{"excludes": [".venv", "runs", ".git", "*.parquet"]}', "--",
           "dromedary", "run", "configs/local.yaml", "--run-dir", str(run_dir), *TINY]
    client_env = {**env, "RAY_AUTH_MODE": "token"}  # Ray 2.60 clusters require the token
    for _ in range(20):  # the dashboard agent takes a few seconds to register
        out = subprocess.run(cmd, env=client_env, capture_output=True, text=True, timeout=900)
        if "No available agent" not in out.stderr + out.stdout and "Connection" not in \
                out.stderr[-500:]:
            return out
        time.sleep(5)
    return out


def rows(run_dir: Path):
    store = StageStore(str(run_dir), "self_align")
    key = lambda r: r.id  # noqa: E731
    return (sorted(SelfAlignRow.from_table(store.read("data", SelfAlignRow.SCHEMA)), key=key),
            sorted(RejectRow.from_table(store.read("rejects", RejectRow.SCHEMA)), key=key))


def test_job_submit_gives_the_same_outputs_as_a_direct_run(head_node, tmp_path, ray_local):
    address, env = head_node
    job_dir = tmp_path / "job"
    out = submit(address, env, job_dir)
    assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-2000:])
    assert "succeeded" in out.stdout + out.stderr
    assert StageStore(str(job_dir), "self_align").read_manifest()["status"] == "done"
    direct_dir = tmp_path / "direct"
    run_pipeline(load_config(PROJECT_ROOT / "configs/local.yaml",
                             [f"run_dir={direct_dir}", *TINY]))
    job_rows, direct_rows = rows(job_dir), rows(direct_dir)
    assert sum(len(t) for t in job_rows) == 8
    assert job_rows == direct_rows
