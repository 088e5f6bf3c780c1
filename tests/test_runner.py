"""The Ray Data runner and the self_align stage on a real local Ray cluster with vLLM actors."""

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
