"""The synthesize stage end to end on a local Ray cluster with the random tiny model.

A random model writes word salad, so these tests assert structure and invariants only. It also
never ends a list item by itself: stopping it at any capital letter ends its items "cleanly"
(finish_reason stop) as runs of lower-case words, some of which pass the filters.
"""

import shutil
import string
from pathlib import Path

import pytest

from dromedary_ray.algos.rouge_dedupe import rouge_l_f, tokenize
from dromedary_ray.algos.synthesis import SYNTHESIS_REASONS
from dromedary_ray.config import PROJECT_ROOT, load_config
from dromedary_ray.data.schemas import PromptRow, RejectRow
from dromedary_ray.data.store import StageStore
from dromedary_ray.data.synth_schemas import CandidateRow
from dromedary_ray.pipeline.driver import run_pipeline

pytestmark = pytest.mark.slow

STOP = "[" + ",".join(string.ascii_uppercase) + "]"
TINY = [
    "model=builtin:tiny-llama",
    "recipe=synthesize_only",
    "engine.batch_size=16",
    "engine.max_model_len=2048",
    "engine.kv_cache_gib=1",
    "engine.cpus_per_engine=1",
    "synthesize.min_words=1",
    "synthesize.self_instruct.target_count=1000",  # never reached: exactly max_rounds rounds
    "synthesize.self_instruct.requests_per_round=6",
    "synthesize.self_instruct.instructions_per_request=2",
    "synthesize.self_instruct.max_rounds=2",
    "synthesize.self_instruct.sampling.max_new_tokens=8",
    f"synthesize.self_instruct.sampling.stop={STOP}",
    "synthesize.red_team.topics_per_type=1",
    "synthesize.red_team.topics_per_request=2",
    "synthesize.red_team.brainstorm_rounds=1",
    "synthesize.red_team.require_question=false",  # word salad has no question marks
    "synthesize.red_team.sampling.max_new_tokens=8",
    f"synthesize.red_team.sampling.stop={STOP}",
]
ROUNDS = 2  # round 1: self-instruct + brainstorm; round 2: self-instruct + questions


def tiny_config(run_dir: Path):
    return load_config(PROJECT_ROOT / "configs/local.yaml", [f"run_dir={run_dir}", *TINY])


def outputs(run_dir: Path) -> tuple[list[PromptRow], list[RejectRow]]:
    store = StageStore(str(run_dir), "synthesize")
    return (PromptRow.from_table(store.read("data", PromptRow.SCHEMA)),
            RejectRow.from_table(store.read("rejects", RejectRow.SCHEMA)))


def round_candidates(run_dir: Path) -> list[CandidateRow]:
    rows = []
    for k in range(1, ROUNDS + 1):
        store = StageStore(str(run_dir), f"synthesize/rounds/round-{k:03d}")
        assert store.read_manifest()["status"] == "done"
        rows += CandidateRow.from_table(store.read("data", CandidateRow.SCHEMA))
    return rows


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, ray_local, tiny_model):
    run_dir = tmp_path_factory.mktemp("synth")
    (report,) = run_pipeline(tiny_config(run_dir))
    return run_dir, report


def test_stage_writes_both_sources_and_accounts_for_every_candidate(first_run):
    run_dir, report = first_run
    prompts, rejects = outputs(run_dir)
    assert report.status == "ran" and report.kept == len(prompts) > 0
    assert report.metrics["rounds"] == ROUNDS and report.metrics["generated_requests"] > 0
    assert {p.source for p in prompts} == {"self_instruct", "tgrt"}
    ids = [p.id for p in prompts] + [r.id for r in rejects]
    assert len(ids) == len(set(ids))
    assert {r.reason for r in rejects} <= SYNTHESIS_REASONS | {"prompt_too_long", "engine_error"}
    # Every raw candidate is a kept prompt or a reject, except the topics kept for questions.
    candidates = round_candidates(run_dir)
    kept_ids, reject_ids = {p.id for p in prompts}, {r.id for r in rejects}
    unaccounted = [c for c in candidates if c.id not in kept_ids | reject_ids]
    assert all(c.kind == "topic" for c in unaccounted)
    assert len(unaccounted) == report.metrics["topics_kept"] > 0
    assert {c.id for c in candidates} >= kept_ids
    by_id = {c.id: c for c in candidates}
    assert all(by_id[p.id].text == p.query and by_id[p.id].source == p.source for p in prompts)
    assert sum(report.metrics["candidates"].values()) == len(candidates)


def test_no_kept_pair_is_a_near_duplicate(first_run):
    run_dir, _ = first_run
    queries = [p.query for p in outputs(run_dir)[0]]
    threshold = tiny_config(run_dir).synthesize.rouge_threshold
    for i, a in enumerate(queries):
        for b in queries[i + 1:]:
            assert rouge_l_f(tokenize(a), tokenize(b)) <= threshold, (a, b)


def test_rerun_skips_and_resume_reuses_the_rounds(first_run):
    run_dir, _ = first_run
    before = outputs(run_dir)
    (again,) = run_pipeline(tiny_config(run_dir))
    assert again.status == "skipped"
    # Lose the stage's output but keep the round sub-stores: the rounds are re-read, not
    # sampled again, and filtering them again gives the same table.
    root = run_dir / "synthesize"
    for name in ("data", "rejects"):
        shutil.rmtree(root / name)
    (root / "manifest.json").unlink()
    (resumed,) = run_pipeline(tiny_config(run_dir))
    assert resumed.status == "ran"
    assert resumed.metrics["generated_requests"] == 0
    assert resumed.metrics["reused_rounds"] == ROUNDS
    assert outputs(run_dir) == before
