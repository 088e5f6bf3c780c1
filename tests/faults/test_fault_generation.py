"""Generation stages under faults: an engine actor killed mid-stage, the driver SIGKILLed
mid-stage. Each case ends with the uninterrupted run's tables: the same row ids, none twice,
none lost, the same sampled text (every row samples with its own seed)."""

import json

import pytest
from fault_helpers import (
    N_PROMPTS,
    assert_tables_equal_reference,
    dromedary_run,
    env_with,
    orphaned_engines,
)

pytestmark = pytest.mark.slow


def test_engine_actor_killed_mid_stage_run_completes(generation_reference, tmp_path):
    """The engine actor dies after its 2nd batch's work, before committing it: Ray Data
    restarts the actor and retries the batch in the same run."""
    marker, run_dir = tmp_path / "fired", tmp_path / "run"
    orphans_before = orphaned_engines()
    out = dromedary_run(run_dir, env=env_with(DROMEDARY_FAULT=f"worker_batch:2:{marker}"))
    assert marker.exists(), "the fault hook never fired: the case proved nothing"
    assert out.returncode == 0, out.stderr[-3000:]
    assert orphaned_engines() <= orphans_before  # the killed actor took its engine with it
    assert_tables_equal_reference(run_dir, generation_reference, "self_align", N_PROMPTS)


def test_driver_sigkilled_mid_stage_then_resumed(generation_reference, tmp_path):
    """The driver dies after 3 of 6 shards are committed; the rerun resumes the stage."""
    marker, run_dir = tmp_path / "fired", tmp_path / "run"
    env = env_with(DROMEDARY_FAULT=f"driver_shard:3:{marker}")
    first = dromedary_run(run_dir, env=env)
    assert first.returncode == -9 and marker.exists(), first.stderr[-3000:]
    manifest = json.loads((run_dir / "self_align/manifest.json").read_text())
    assert manifest["status"] == "running"
    committed = len(list((run_dir / "self_align/data").glob("*.parquet")))
    assert 3 <= committed < N_PROMPTS // 4, committed  # killed mid-stage, not after it
    second = dromedary_run(run_dir, env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming" in second.stderr
    manifest = json.loads((run_dir / "self_align/manifest.json").read_text())
    assert manifest["status"] == "done"
    assert manifest["metrics"]["resumed_rows"] == 4 * committed  # nothing committed is redone
    assert_tables_equal_reference(run_dir, generation_reference, "self_align", N_PROMPTS)


def test_engine_actor_killed_after_its_commit_writes_no_row_twice(generation_reference,
                                                                  tmp_path):
    """The engine actor dies right after committing its 2nd batch's shard, before its reply
    reaches the driver: Ray restarts it and runs the batch again, which writes the same shard
    name over the first copy, so every row is on disk once."""
    marker, run_dir = tmp_path / "fired", tmp_path / "run"
    out = dromedary_run(run_dir, env=env_with(DROMEDARY_FAULT=f"worker_committed:2:{marker}"))
    assert marker.exists(), "the fault hook never fired: the case proved nothing"
    assert out.returncode == 0, out.stderr[-3000:]
    shards = list((run_dir / "self_align" / "data").glob("*.parquet"))
    assert len(shards) == N_PROMPTS // 4, shards  # one file per batch, the retried one too
    assert_tables_equal_reference(run_dir, generation_reference, "self_align", N_PROMPTS)
