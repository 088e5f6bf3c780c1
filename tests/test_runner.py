"""The Ray Data runner and the self_align stage on a real local Ray cluster with vLLM actors."""

from pathlib import Path

import pyarrow as pa
import pytest

from dromedary_ray.algos.parsing import SELF_ALIGN_REASONS
from dromedary_ray.config import PROJECT_ROOT, load_config
from dromedary_ray.data.schemas import AnswerRow, PromptRow, RejectRow, SelfAlignRow
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


def answer_task(max_new_tokens: int = 48):
    from dromedary_ray.config import SamplingConfig
    from dromedary_ray.runtime.generate import TaskSpec
    from dromedary_ray.stages.answer import AnswerTask

    return TaskSpec(AnswerTask, {"sampling": SamplingConfig(max_new_tokens=max_new_tokens),
                                 "system_prompt": None, "min_answer_words": 1,
                                 "max_repeated_ngram_fraction": 1.0, "stage": "answer"})


def prompt_rows(n: int) -> pa.Table:
    return PromptRow.to_table([PromptRow(f"p{i:03d}", "seed", f"Say something about {i}.")
                               for i in range(n)])


def test_batches_in_flight_overlap_on_one_engine_and_pools_are_reused(ray_local, tiny_model,
                                                                      tmp_path):
    """Two batches at a time on one engine actor: their spans overlap. A second pass with the
    same `Engines` runs on the same actor process (no second engine start)."""
    from dromedary_ray.config import EngineConfig
    from dromedary_ray.runtime.generate import Engines, run_generation
    from dromedary_ray.stages.self_align import busy_seconds

    cfg = EngineConfig(max_model_len=1024, kv_cache_gib=1, cpus_per_engine=1, batch_size=4,
                       batches_in_flight=2)
    with Engines() as engines:
        first = run_generation(prompt_rows(16), store=StageStore(str(tmp_path), "a"),
                               model_path=tiny_model, engine_cfg=cfg, task=answer_task(),
                               engines=engines)
        second = run_generation(prompt_rows(4), store=StageStore(str(tmp_path), "b"),
                                model_path=tiny_model, engine_cfg=cfg, task=answer_task(),
                                engines=engines)
    assert len(first) == 4 and sum(s.rows for s in first) == 16
    assert {s.worker for s in first} == {s.worker for s in second}  # one actor, both passes
    spans = [(s.started, s.seconds) for s in first]
    assert busy_seconds(spans) < 0.9 * sum(s.seconds for s in first)  # batches overlapped
    for stage in ("a", "b"):  # each batch committed as one shard, every row once
        store = StageStore(str(tmp_path), stage)
        ids = store.done_ids({"data": AnswerRow.SCHEMA, "rejects": RejectRow.SCHEMA})
        assert len(ids) == (16 if stage == "a" else 4)
