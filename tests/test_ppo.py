"""The ppo stage on a local Ray with the tiny model: weight sync, learning, resume, the stage.

(a) after one update the rollout engine's log-probs equal the trainer's and moved;
(b) with a programmatic reward PPO raises the mean reward while the KL stays bounded;
(c) a killed run resumes from its last checkpoint, and never runs zero steps silently;
(d) the stage runs through `run_stage` with a reward model folder (vLLM's pooling runner).
"""

import json
from pathlib import Path

import pytest
from ppo_run import run_ppo_script, script_result, write_script

from dromedary_ray.config import EngineConfig, PPOConfig, SamplingConfig
from dromedary_ray.data.schemas import PromptRow

pytestmark = pytest.mark.slow

ENGINE = EngineConfig(max_model_len=256, kv_cache_gib=1, cpus_per_engine=1)
QUERIES = ["Name a prime number.", "What is the capital of France?", "Write a haiku about rain.",
           "How do I boil an egg?", "Give me a synonym for happy.", "What is 2 + 2?",
           "Suggest a name for a cat.", "Why is the sky blue?"]
PROMPTS = [PromptRow(f"p{i}", "seed", q) for i, q in enumerate(QUERIES)]


def _cfg(**overrides) -> PPOConfig:
    base = dict(steps=1, prompts_per_step=4, samples_per_prompt=1, mini_batch_size=2,
                ppo_epochs=2, learning_rate=1e-3, value_learning_rate=1e-3, value_init="policy",
                length_bonus_per_token=0.0, unfinished_penalty=0.0, kl_coef=0.01,
                sampling=SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=12))
    return PPOConfig(**{**base, **overrides})


def _low_id_share():
    def low_id_share(prompts, responses, token_ids):
        """A dense reward: the share of response tokens among the first eighth of the
        vocabulary (a random policy scores ~0.125)."""
        return [sum(t < 6144 for t in ids) / max(len(ids), 1) for ids in token_ids]

    return low_id_share  # a closure: Ray pickles it by value (a test module is not importable)


low_id_share = _low_id_share()


def _max_gap(a, b):
    return max(abs(x - y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True))


def test_weight_sync_makes_the_engine_score_tokens_as_the_trainer(ray_local, tiny_model, tmp_path):
    import ray

    from dromedary_ray.data.store import StageStore
    from dromedary_ray.runtime.ppo import loop as L
    from dromedary_ray.salmon_principles import load_salmon_principles

    cfg = _cfg()
    actors = L.start_actors(tiny_model, low_id_share, cfg, ENGINE, None)
    try:
        loop = L.Loop(PROMPTS, load_salmon_principles(cfg.principles_file), cfg, actors,
                      StageStore(str(tmp_path), "ppo"))
        rollouts = L.reference(loop, L.score(loop, L.generate(loop, 1)))
        rollouts, stats = L.advantages(cfg, rollouts)
        assert stats["rollout_logprob_gap"] < 1e-4  # sampler and trainer agree before any update
        prompts = rollouts["prompt_token_ids"].to_pylist()
        responses = rollouts["response_token_ids"].to_pylist()
        engine = actors.rollouts[0]
        before = ray.get(engine.token_logprobs.remote(prompts, responses))
        assert _max_gap(before, rollouts["policy_logprobs"].to_pylist()) < 1e-4
        ray.get(actors.trainer.update.remote(rollouts, 1))
        trainer_after = ray.get(actors.trainer.policy_logprobs.remote(rollouts))
        assert _max_gap(ray.get(engine.token_logprobs.remote(prompts, responses)), before) < 1e-6
        L.sync_weights(actors, 1, cfg)
        after = ray.get(engine.token_logprobs.remote(prompts, responses))
        assert _max_gap(after, trainer_after) < 1e-4
        assert _max_gap(after, before) > 1e-2
        assert ray.get(engine.health.remote())["weights_version"] == 1
    finally:
        L.stop_actors(actors)


def test_ppo_raises_a_programmatic_reward_with_bounded_kl(ray_local, tiny_model, tmp_path):
    from dromedary_ray.data.salmon_schemas import RolloutRow
    from dromedary_ray.data.store import StageStore
    from dromedary_ray.runtime.ppo.loop import STEPS_FILE, run_ppo

    # The random tiny model is near-uniform over 49k tokens (entropy ~10.8 nats): no token
    # recurs often enough to be reinforced. At T=0.1 its logits (std ~0.23) become peaked, and
    # PPO trains that tempered policy (the trainer divides its logits by the same T).
    steps = 20
    store = StageStore(str(tmp_path), "ppo")
    cfg = _cfg(steps=steps, checkpoint_every_steps=100, learning_rate=1e-5, kl_coef=0.05,
               sampling=SamplingConfig(temperature=0.1, top_p=1.0, max_new_tokens=12))
    result = run_ppo(PROMPTS, policy_path=tiny_model, reward=low_id_share, cfg=cfg,
                     engine=ENGINE, store=store)
    lines = [json.loads(x) for x in (tmp_path / "ppo" / STEPS_FILE).read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, steps + 1))
    for key in ("reward_mean", "kl", "entropy", "response_length", "clip_fraction",
                "value_loss", "seconds_generate", "seconds_update", "seconds_sync"):
        assert all(isinstance(x[key], float) for x in lines), key
    rewards = [x["reward_mean"] for x in lines]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    print(f"reward {first:.3f} -> {last:.3f}; kl {[round(x['kl'], 2) for x in lines]}; "
          f"s/step {sum(x['seconds_step'] for x in lines) / steps:.2f}")
    assert last > first + 0.1
    # nats per 12-token response; lr 1e-3 instead of 1e-5 runs away to ~15
    assert max(x["kl"] for x in lines[-5:]) < 8.0
    assert all(x["rollout_logprob_gap"] < 1e-3 for x in lines)  # every sync arrived
    assert result.steps_run == steps and result.resumed_from_step == 0
    assert (Path(result.model_dir) / "config.json").exists()
    table = store.read("data", RolloutRow.SCHEMA)
    assert table.num_rows == steps * 4
    assert set(table["step"].to_pylist()) == set(range(1, steps + 1))


def test_killed_run_resumes_from_its_last_checkpoint(ray_local, tiny_model, tmp_path):
    import ray

    address = ray.get_runtime_context().gcs_address
    script = write_script(tmp_path)
    run_dir, marker = tmp_path / "run", tmp_path / "killed"
    steps_file = run_dir / "ppo" / "ppo_steps.jsonl"

    def logged_steps():
        return [json.loads(x)["step"] for x in steps_file.read_text().splitlines()]

    killed = run_ppo_script(script, address, run_dir, tiny_model, 4, fault=f"ppo_step:3:{marker}")
    assert killed.returncode == -9 and marker.exists(), killed.stderr[-3000:]
    assert logged_steps() == [1, 2, 3]
    assert [p.name for p in (run_dir / "ppo" / "checkpoints").glob("step-*")] == ["step-000002"]
    assert not (run_dir / "ppo" / "model").exists()

    resumed = script_result(run_ppo_script(script, address, run_dir, tiny_model, 4))
    assert resumed["resumed_from_step"] == 2 and resumed["steps_run"] == 2
    assert logged_steps() == [1, 2, 3, 4]  # step 3 rerun from the checkpoint, logged once
    weights = (Path(resumed["model_dir"]) / "model.safetensors").read_bytes()

    # A checkpoint already at `steps`: finish with its policy, run nothing, and say so.
    again = run_ppo_script(script, address, run_dir, tiny_model, 4)
    finished = script_result(again)
    assert finished["resumed_from_step"] == 4 and finished["steps_run"] == 0
    assert "no step to run" in again.stderr
    assert (Path(finished["model_dir"]) / "model.safetensors").read_bytes() == weights
    assert logged_steps() == [1, 2, 3, 4]

    # A checkpoint past `steps`: refused, with what to do.
    shorter = run_ppo_script(script, address, run_dir, tiny_model, 3)
    assert shorter.returncode != 0 and "past ppo.steps=3" in shorter.stderr


def test_stage_runs_through_run_stage_with_a_reward_model_folder(ray_local, tiny_model,
                                                                 tiny_reward_model, tmp_path):
    import shutil

    from dromedary_ray.config import load_config
    from dromedary_ray.data.salmon_schemas import RolloutRow
    from dromedary_ray.data.schemas import RejectRow
    from dromedary_ray.data.store import StageStore
    from dromedary_ray.pipeline.driver import run_stage

    run_dir = tmp_path / "run"
    shutil.copytree(tiny_model, run_dir / "verbose_clone" / "model")
    shutil.copytree(tiny_reward_model, run_dir / "reward_model" / "model")
    prompts = [*PROMPTS[:3], PromptRow("long", "seed", "word " * 1100)]
    StageStore(str(run_dir), "synthesize").write_table(PromptRow.to_table(prompts),
                                                       RejectRow.empty())
    config = load_config(None, [
        f"run_dir={run_dir}", "recipe=salmon", "engine.max_model_len=1024",
        "engine.kv_cache_gib=1", "engine.cpus_per_engine=1", "ppo.steps=2",
        "ppo.prompts_per_step=2", "ppo.mini_batch_size=2", "ppo.ppo_epochs=1",
        "ppo.sampling.max_new_tokens=8", "ppo.value_init=reward_model"])
    fps = {"synthesize": "s", "verbose_clone": "v", "reward_model": "r"}
    report = run_stage(config, "ppo", fps)
    assert report.status == "ran" and report.kept == 4
    assert report.reject_reasons == {"prompt_too_long": 1}
    assert report.metrics["steps_run"] == 2 and "mean_seconds_score" in report.metrics
    rows = RolloutRow.from_table(StageStore(str(run_dir), "ppo").read("data", RolloutRow.SCHEMA))
    assert all(len(r.principles) >= 4 and r.score == r.score for r in rows)  # scored, not NaN
    assert len({r.score for r in rows}) > 1  # the RM told the responses apart
    assert all(len(r.values) == len(r.response_token_ids) for r in rows)
    assert (run_dir / "ppo" / "model" / "config.json").exists()
    assert run_stage(config, "ppo", fps).status == "skipped"
