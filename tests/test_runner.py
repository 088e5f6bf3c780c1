"""The Ray Data runner and the self_align stage on a real local Ray cluster with vLLM actors."""

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from dromedary_ray.algos.parsing import SELF_ALIGN_REASONS
from dromedary_ray.config import PROJECT_ROOT, load_config
from dromedary_ray.data.schemas import PromptRow, RejectRow, SelfAlignRow
from dromedary_ray.data.store import StageStore
from dromedary_ray.pipeline.driver import run_pipeline

pytestmark = pytest.mark.slow

CONFIG = str(PROJECT_ROOT / "configs/local.yaml")
N_PROMPTS = 24
TINY = [
    "model=builtin:tiny-llama",
    f"seeds.max_prompts={N_PROMPTS}",
    "engine.batch_size=4",
    "engine.max_model_len=3072",
    "engine.kv_cache_gib=1",
    "engine.cpus_per_engine=1",
    "self_align.sampling.max_new_tokens=16",
]


def tiny_config(run_dir: Path, *extra: str):
    return load_config(PROJECT_ROOT / "configs/local.yaml", [f"run_dir={run_dir}", *TINY, *extra])


def stage_rows(run_dir: Path) -> tuple[list[SelfAlignRow], list[RejectRow]]:
    store = StageStore(str(run_dir), "self_align")
    return (SelfAlignRow.from_table(store.read("data", SelfAlignRow.SCHEMA)),
            RejectRow.from_table(store.read("rejects", RejectRow.SCHEMA)))


def assert_every_row_once(run_dir: Path) -> None:
    kept, rejects = stage_rows(run_dir)
    ids = [r.id for r in kept] + [r.id for r in rejects]
    prompts = StageStore(str(run_dir), "seeds").read("data", PromptRow.SCHEMA)
    assert len(ids) == len(set(ids)) == N_PROMPTS
    assert set(ids) == set(prompts["id"].to_pylist())


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, ray_local, tiny_model):
    """An uninterrupted run with two engine actors."""
    run_dir = tmp_path_factory.mktemp("baseline")
    reports = run_pipeline(tiny_config(run_dir, "engine.num_engines=2"))
    return run_dir, reports


def test_two_actors_yield_every_row_once(baseline):
    run_dir, reports = baseline
    assert_every_row_once(run_dir)
    self_align = reports[-1]
    assert self_align.status == "ran" and self_align.kept + self_align.rejected == N_PROMPTS
    # A random model rambles: its rows are rejected with a known reason and their text kept.
    kept, rejects = stage_rows(run_dir)
    assert {r.reason for r in rejects} <= SELF_ALIGN_REASONS
    assert all(r.detail for r in rejects)
    assert self_align.metrics["batches"] == N_PROMPTS // 4
    manifest = StageStore(str(run_dir), "self_align").read_manifest()
    assert manifest["status"] == "done"
    assert manifest["rows"] == {"data": len(kept), "rejects": len(rejects)}


def test_finished_stage_is_skipped_and_changed_config_reruns(baseline, tmp_path):
    run_dir, _ = baseline
    again = run_pipeline(tiny_config(run_dir, "engine.num_engines=2"))
    assert [r.status for r in again] == ["skipped", "skipped"]
    # Placement is not part of the fingerprint: one engine instead of two still skips.
    assert run_pipeline(tiny_config(run_dir))[-1].status == "skipped"


def orphaned_engines() -> set[int]:
    """vLLM processes whose parent died (re-parented to init): leaked CPU eaters."""
    out = subprocess.run(["ps", "-eo", "pid=,ppid=,comm="], capture_output=True, text=True)
    return {int(pid) for pid, ppid, comm in (line.split(None, 2) for line in
                                             out.stdout.splitlines())
            if ppid == "1" and comm.startswith("VLLM")}


def test_actor_killed_mid_stage_still_yields_every_row_once(baseline, tmp_path, monkeypatch):
    orphans_before = orphaned_engines()
    marker = tmp_path / "killed"
    monkeypatch.setenv("DROMEDARY_FAULT", f"worker_batch:2:{marker}")
    run_dir = tmp_path / "run"
    reports = run_pipeline(tiny_config(run_dir, "engine.num_engines=2"))
    assert marker.exists(), "the fault hook never fired: the test proved nothing"
    assert orphaned_engines() <= orphans_before  # the killed worker took its engine with it
    assert reports[-1].kept + reports[-1].rejected == N_PROMPTS
    assert_every_row_once(run_dir)
    # Per-row seeds: the retried batch sampled exactly what the uninterrupted run did.
    assert_same_rows(run_dir, baseline[0])


def assert_same_rows(a: Path, b: Path) -> None:
    """Same ids, and (per-row seeds) the same sampled text, whatever the batching."""
    key = lambda r: r.id  # noqa: E731
    for rows_a, rows_b in zip(stage_rows(a), stage_rows(b), strict=True):
        assert sorted(rows_a, key=key) == sorted(rows_b, key=key)


def test_driver_killed_and_restarted_gives_the_same_rows(baseline, tmp_path):
    """SIGKILL the driver after two committed batches, rerun, compare with the baseline."""
    run_dir = tmp_path / "run"
    marker = tmp_path / "driver-killed"
    cmd = [sys.executable, "-m", "dromedary_ray.cli", "run", CONFIG, "--run-dir", str(run_dir),
           *TINY]
    env = {**os.environ, "DROMEDARY_FAULT": f"driver_shard:2:{marker}"}
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == -9 and marker.exists(), first.stderr[-2000:]
    store = StageStore(str(run_dir), "self_align")
    assert store.read_manifest()["status"] == "running"
    partial = len(store.committed_shards())
    assert 2 <= partial < N_PROMPTS // 4
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resuming" in second.stderr
    manifest = store.read_manifest()
    assert manifest["status"] == "done" and manifest["metrics"]["resumed_rows"] >= 8
    assert_every_row_once(run_dir)
    assert_same_rows(run_dir, baseline[0])


def test_stage_rejects_over_long_prompts_with_a_reason(ray_local, tmp_path):
    run_dir = tmp_path / "run"
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text('{"id": "ok", "instruction": "Say hi."}\n'
                     '{"id": "huge", "instruction": "' + "blah " * 3000 + '"}\n')
    run_pipeline(tiny_config(run_dir, f"seeds.file={seeds}"))
    kept, rejects = stage_rows(run_dir)
    by_id = {r.id: r for r in rejects}
    assert by_id["huge"].reason == "prompt_too_long"
    assert "exceed max_model_len 3072" in by_id["huge"].detail
    assert "ok" in {r.id for r in kept} | set(by_id)


def test_output_tables_open_as_plain_parquet(baseline):
    import pyarrow.parquet as pq

    run_dir, _ = baseline
    table = pq.read_table(run_dir / "self_align" / "rejects")
    assert table.schema.equals(RejectRow.SCHEMA) or set(RejectRow.SCHEMA.names) <= set(
        table.schema.names)
    assert isinstance(table, pa.Table) and table.num_rows > 0
