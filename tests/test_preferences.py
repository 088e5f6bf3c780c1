"""SALMON's preferences stage on real engines: the judging scores from the vLLM and the
transformers next-token paths agree, flip when the replies are swapped, and the stage runs
through the driver on a hand-written prompt table."""

import shutil
from pathlib import Path

import pytest

from dromedary_ray.config import PROJECT_ROOT, EngineConfig, PreferencesConfig, load_config
from dromedary_ray.data.salmon_schemas import PreferenceRow, ResponsePairRow
from dromedary_ray.data.schemas import PromptRow, RejectRow
from dromedary_ray.data.store import StageStore
from dromedary_ray.salmon_principles import load_salmon_principles

pytestmark = pytest.mark.slow

PAIRS = [
    ResponsePairRow("p1", "general", "Name a prime number.", "Seven is prime.", "Nine, I think."),
    ResponsePairRow("p2", "reasoning", "What is 12 times 3?", "36.", "It is 38 because 12+3."),
    ResponsePairRow("p3", "red_team", "How do I pick a lock?", "I can't help with breaking "
                    "into places, but a locksmith can.", "Use a pin and push hard."),
]


def judged(engine, pairs) -> dict[str, PreferenceRow]:
    from dromedary_ray.stages.preferences import JudgeTask

    task = JudgeTask(engine.tokenizer, PreferencesConfig(principles_per_pair=3),
                     load_salmon_principles("principles/salmon.yaml"))
    result = task.process(engine, ResponsePairRow.to_table(pairs))
    assert result.rejects.num_rows == 0
    return {r.id: r for r in PreferenceRow.from_table(result.kept)}


def swapped(pairs):
    return [ResponsePairRow(p.id, p.prompt_type, p.prompt, p.response_b, p.response_a)
            for p in pairs]


def test_judging_agrees_across_backends_and_flips_when_swapped(tiny_model):
    from dromedary_ray.engines import make_engine

    results = {}
    for backend in ("transformers", "vllm"):
        engine = make_engine(tiny_model, EngineConfig(backend=backend, max_model_len=2048,
                                                      kv_cache_gib=1, cpus_per_engine=1))
        try:
            results[backend] = (judged(engine, PAIRS), judged(engine, swapped(PAIRS)))
        finally:
            engine.close()
    (hf, hf_swapped), (vl, vl_swapped) = results["transformers"], results["vllm"]
    assert sorted(hf) == sorted(vl) and len(hf) == 3 * len(PAIRS)  # same principles drawn
    for key, row in hf.items():
        assert row.forward == pytest.approx(vl[key].forward, abs=2e-3)
        assert row.backward == pytest.approx(vl[key].backward, abs=2e-3)
        # Swapping the replies swaps the two orders and turns both gaps around.
        assert hf_swapped[key].forward == pytest.approx(-row.backward, abs=1e-5)
        assert hf_swapped[key].score == pytest.approx(-row.score, abs=1e-5)
        assert vl_swapped[key].score == pytest.approx(-vl[key].score, abs=2e-3)
        assert row.consistent == (row.forward * row.backward > 0)
    assert any(r.score != 0 for r in hf.values())


def test_preferences_stage_through_the_driver(tmp_path: Path, tiny_model, ray_local):
    from dromedary_ray.pipeline.driver import run_stage

    run = tmp_path / "run"
    prompts = [PromptRow(f"s{i:02d}", "seed", q) for i, q in enumerate([
        "Name a prime number.", "Write a haiku about rain.", "What is 7 plus 5?",
        "How can I hurt someone without getting caught?", "Explain what a noun is.",
        "Give me a tip for sleeping better."])]
    StageStore(str(run), "synthesize").write_table(PromptRow.to_table(prompts), RejectRow.empty())
    shutil.copytree(tiny_model, run / "verbose_clone" / "model")  # the "SFT" policy
    config = load_config(PROJECT_ROOT / "configs/local.yaml", [
        f"run_dir={run}", "recipe=salmon", "model=builtin:tiny-llama", "engine.batch_size=4",
        "engine.max_model_len=2048", "engine.kv_cache_gib=1", "engine.cpus_per_engine=1",
        "preferences.min_answer_words=1", "preferences.sampling.max_new_tokens=12",
        "preferences.sampling.stop=[A,E,I,O,U]", "preferences.principles_per_pair=2"])
    report = run_stage(config, "preferences",
                       {"synthesize": "hand-written", "verbose_clone": "hand-written"})
    pairs = StageStore(str(run), "preferences/pairs")
    n_pairs = pairs.read("data", ResponsePairRow.SCHEMA).num_rows
    n_pair_rejects = pairs.read("rejects", RejectRow.SCHEMA).num_rows
    assert n_pairs + n_pair_rejects == len(prompts) and n_pairs > 0
    rows = PreferenceRow.from_table(StageStore(str(run), "preferences").read(
        "data", PreferenceRow.SCHEMA))
    assert len(rows) == 2 * n_pairs == report.kept  # two principles judged per pair
    assert {r.pair_id for r in rows} == set(pairs.read("data", ResponsePairRow.SCHEMA)["id"]
                                            .to_pylist())
    assert report.metrics["judgments"] == len(rows)
    assert {r.prompt_type for r in rows} <= {"general", "reasoning", "red_team", "creative",
                                              "coding"}
    again = run_stage(config, "preferences",
                      {"synthesize": "hand-written", "verbose_clone": "hand-written"})
    assert again.status == "skipped" and again.kept == report.kept
