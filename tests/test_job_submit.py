"""`ray job submit` for real: a head node started with `ray start` on 127.0.0.1, the tiny recipe
submitted as a job, and its outputs compared with a direct run of the same config."""

from pathlib import Path

import pytest
from ray_head import ray_head, submit

from dromedary_ray.config import PROJECT_ROOT, load_config
from dromedary_ray.data.schemas import RejectRow, SelfAlignRow
from dromedary_ray.data.store import StageStore
from dromedary_ray.pipeline.driver import run_pipeline

pytestmark = pytest.mark.slow

TINY = ["model=builtin:tiny-llama", "seeds.max_prompts=8", "engine.batch_size=4",
        "engine.cpus_per_engine=1", "engine.kv_cache_gib=1",
        "self_align.sampling.max_new_tokens=16"]


@pytest.fixture
def head_node():
    """A separate Ray cluster, stopped with exactly the processes it started."""
    with ray_head("--num-cpus=4") as head:
        yield head


def rows(run_dir: Path):
    store = StageStore(str(run_dir), "self_align")
    key = lambda r: r.id  # noqa: E731
    return (sorted(SelfAlignRow.from_table(store.read("data", SelfAlignRow.SCHEMA)), key=key),
            sorted(RejectRow.from_table(store.read("rejects", RejectRow.SCHEMA)), key=key))


def test_job_submit_gives_the_same_outputs_as_a_direct_run(head_node, tmp_path, ray_local):
    job_dir = tmp_path / "job"
    out = submit(head_node, job_dir, TINY)
    assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-2000:])
    assert "succeeded" in out.stdout + out.stderr
    assert StageStore(str(job_dir), "self_align").read_manifest()["status"] == "done"
    direct_dir = tmp_path / "direct"
    run_pipeline(load_config(PROJECT_ROOT / "configs/local.yaml",
                             [f"run_dir={direct_dir}", *TINY]))
    job_rows, direct_rows = rows(job_dir), rows(direct_dir)
    assert sum(len(t) for t in job_rows) == 8
    assert job_rows == direct_rows
