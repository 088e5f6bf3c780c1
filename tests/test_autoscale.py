"""Autoscaling proven locally (issue 9): the tiny `dromedary` recipe as a Ray job on a simulated
autoscaling cluster (cluster/local-sim.yaml: the pools of our cloud configs, every node a process
on this machine), its engines and trainers asking for the pool markers.

Asserted (slow test): both GPU pools start at zero; the generation pool grows while the
generation stages run and the training pool stays at zero then; the training pool grows for
engrave, while the generation pool empties; both are back at zero soon after the job; the job
succeeds; and every table the job wrote, and the ends of the loss curve, equal a plain local
run's (where a stage runs changes nothing it computes). The job stops after engrave
(`until=engrave`): verbose_clone, which generates and then fine-tunes, would show both pools
again for a few more minutes of suite time. The fast test checks the simulated cluster's file
against the cloud's.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from pool_watch import POOLS
from ray_head import free_port, head_env, ray_head, submit
from test_cluster_configs import check_pool_markers, check_ray_schema, load_autoscaler
from tiny_run import tiny_dromedary

from dromedary_ray.config import PROJECT_ROOT

SIM_CONFIG = PROJECT_ROOT / "cluster/local-sim.yaml"
POOL_MARKERS = ["ray.generation_pool=pool_generation", "ray.training_pool=pool_training"]
TINY = tiny_dromedary()  # the settings of the shared plain run (conftest.py)
GENERATION_STAGES, TABLE_STAGES = ("synthesize", "self_align"), ("synthesize", "self_align")
SHRINK_WITHIN_S = 90  # idle timeout 6 s + update interval 1 s, with room for a loaded machine


@pytest.fixture
def sim_cluster(tmp_path):
    """A fake multi-node cluster from cluster/local-sim.yaml on 127.0.0.1, and a watcher writing
    its node counts per pool every second; both stopped with every process they started."""
    gcs = free_port()
    config = yaml.safe_load(SIM_CONFIG.read_text())
    config["provider"]["gcs_address"] = f"127.0.0.1:{gcs}"  # new nodes must find our GCS port
    sim = tmp_path / "local-sim.yaml"
    sim.write_text(yaml.safe_dump(config))
    env = head_env(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
    samples = tmp_path / "pools.jsonl"
    with ray_head("--num-cpus=0", f"--autoscaling-config={sim}", gcs_port=gcs, env=env,
                  log=tmp_path / "head.log") as head:
        watcher = subprocess.Popen(
            [sys.executable, str(Path(__file__).parent / "pool_watch.py"), head.gcs,
             str(samples)], env=env, stdout=subprocess.DEVNULL,
            stderr=open(tmp_path / "watch.log", "w"))  # noqa: SIM115 - lives with the watcher
        try:
            yield head, samples
        finally:
            watcher.terminate()
            watcher.wait(timeout=30)


def read_samples(path: Path) -> list[dict]:
    """Every complete line so far (the watcher may be half-way through writing the last)."""
    lines = path.read_text().split("\n")[:-1] if path.exists() else []
    return [json.loads(line) for line in lines]


def wait_for(path: Path, done, timeout_s: float) -> list[dict]:
    """Samples once `done(samples)` holds; fails the test after `timeout_s`."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        samples = read_samples(path)
        if samples and done(samples):
            return samples
        time.sleep(1)
    raise AssertionError(f"pools did not reach the expected state in {timeout_s} s: "
                         f"{timeline(read_samples(path))}")


def stage_window(run: Path, stage: str) -> tuple[float, float]:
    manifest = json.loads((run / stage / "manifest.json").read_text())
    assert manifest["status"] == "done", stage
    return manifest["started"], manifest["finished"]


def during(samples: list[dict], start: float, end: float, pool: str) -> list[int]:
    counts = [s[pool] for s in samples if start <= s["t"] <= end]
    assert counts, f"no samples between {start} and {end}"
    return counts


def timeline(samples: list[dict]) -> list[str]:
    """The counts each time they change, as `+seconds gen/train/cpu`, for failure messages."""
    out, last = [], None
    for s in samples:
        now = tuple(s[p] for p in POOLS)
        if now != last:
            out.append(f"+{s['t'] - samples[0]['t']:.0f}s {'/'.join(map(str, now))}")
            last = now
    return out


def tables(run: Path, stage: str) -> dict[str, list[dict]]:
    """A stage's kept and rejected rows, in id order."""
    return {kind: sorted(pq.read_table(run / stage / kind).to_pylist(), key=lambda r: r["id"])
            for kind in ("data", "rejects") if (run / stage / kind).exists()}


def losses(run: Path) -> tuple[float, float, int]:
    """(first loss, final loss, steps) of engrave."""
    m = json.loads((run / "engrave/manifest.json").read_text())["metrics"]
    return m["first_loss"], m["final_loss"], m["steps"]


def test_sim_config_has_the_cloud_pools_and_ray_accepts_it():
    """Fast: the same GPU pools and markers (one unit per GPU) as aws.yaml, under Ray's schema."""
    sim, aws = load_autoscaler("local-sim.yaml"), load_autoscaler("aws.yaml")
    assert check_ray_schema(sim) == [] and check_pool_markers(sim["available_node_types"]) == []
    pools = {"cpu_worker", "gpu_generation", "gpu_training"}
    assert pools <= set(aws["available_node_types"]) and \
        set(sim["available_node_types"]) == pools | {"ray.head.default"}
    for name in pools:
        node = sim["available_node_types"][name]
        assert node["min_workers"] == 0, name  # every pool starts empty, as on the clouds
        assert {k for k in node["resources"] if k.startswith("pool_")} == \
            {k for k in aws["available_node_types"][name]["resources"] if k.startswith("pool_")}
    assert sim["available_node_types"]["ray.head.default"]["resources"] == {"CPU": 0}


@pytest.mark.slow
def test_pools_grow_from_zero_for_their_stages_and_shrink_after(sim_cluster, tmp_path,
                                                               tiny_dromedary_run):
    head, samples_path = sim_cluster
    wait_for(samples_path, lambda s: True, 120)  # the watcher has joined the cluster
    job = tmp_path / "job"
    # No working dir upload: fake nodes share this machine's disk, and each new one unpacks
    # the job's copy again over the folder the driver runs in (cluster/README.md).
    out = submit(head, job, [*TINY, *POOL_MARKERS, "until=engrave"], upload=False, timeout=1500)
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-3000:])
    assert "succeeded" in out.stdout + out.stderr
    ended = time.time()
    samples = wait_for(samples_path, lambda s: s[-1]["t"] > ended and not any(
        s[-1][p] for p in POOLS), SHRINK_WITHIN_S)
    seen = timeline(samples)
    print("pools gen/train/cpu:", seen)

    gen_start, gen_end = stage_window(job, GENERATION_STAGES[0])[0], \
        stage_window(job, GENERATION_STAGES[-1])[1]
    before = [s for s in samples if s["t"] < gen_start]
    assert before and all(s["gpu_generation"] == s["gpu_training"] == 0 for s in before), seen
    # Generation work grows only its own pool: one engine, one marker unit, one node.
    assert max(during(samples, gen_start, gen_end, "gpu_generation")) >= 1, seen
    assert max(during(samples, gen_start, gen_end, "gpu_training")) == 0, seen
    engrave_start, engrave_end = stage_window(job, "engrave")
    assert max(during(samples, engrave_start, engrave_end, "gpu_training")) >= 1, seen
    # The generation node, idle since self_align, went while engrave trained.
    assert min(during(samples, engrave_start, engrave_end, "gpu_generation")) == 0, seen
    assert not (job / "verbose_clone").exists()  # `until` stopped the recipe there
    assert max(s["gpu_generation"] for s in samples) <= 2, seen  # the pools' max_workers
    assert max(s["gpu_training"] for s in samples) <= 2, seen

    direct, plain = tiny_dromedary_run
    assert plain.returncode == 0, plain.stderr[-3000:]
    for stage in TABLE_STAGES:
        job_tables, direct_tables = tables(job, stage), tables(direct, stage)
        assert job_tables["data"], stage
        assert job_tables == direct_tables, stage
    assert losses(job) == losses(direct)  # the fine-tune on the training pool: same curve ends

