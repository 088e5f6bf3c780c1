"""The DeepSpeed ZeRO-3 PPO trainer group (`ppo.trainer: deepspeed`) and LoRA PPO (`ppo.lora`),
on a local Ray with the tiny model, two gloo ranks on CPU.

(a) equivalence: the group's old/reference log-probs and values, one PPO update's losses and
    the updated weights equal the one-process trainer's on the same rollouts (same AdamW); and
    the one-process trainer's update is the same in micro-batches as on whole minibatches;
(b) weight sync: after an update, the rollout engine's log-probs for the same tokens equal the
    trainer's, for the group's full weights (a safetensors folder rank 0 wrote once) and for a
    LoRA adapter (a new LoRARequest), with either trainer.
"""

import dataclasses
import os
import random
from pathlib import Path

import pytest

from dromedary_ray.config import EngineConfig, PPOConfig, PPOLoRAConfig, SamplingConfig
from dromedary_ray.data.salmon_schemas import RolloutRow

pytestmark = pytest.mark.slow

# DeepSpeed compiles ops into this cache on first use (scripts/test.sh sets the same default).
os.environ.setdefault("TORCH_EXTENSIONS_DIR",
                      str(Path.home() / ".cache" / "dromedary-ray" / "torch_extensions"))

ENGINE = EngineConfig(max_model_len=256, kv_cache_gib=1, cpus_per_engine=1)


def _cfg(**overrides) -> PPOConfig:
    base = dict(steps=1, prompts_per_step=8, samples_per_prompt=1, mini_batch_size=4,
                ppo_epochs=2, learning_rate=1e-3, value_learning_rate=1e-3, value_init="policy",
                length_bonus_per_token=0.0, unfinished_penalty=0.0, kl_coef=0.01,
                sampling=SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=8))
    return PPOConfig(**{**base, **overrides})


def _rollouts(n: int = 8, seed: int = 0):
    """Hand-made rollouts of random tokens (ragged prompts and responses) with scores: what the
    trainer reads, without an engine."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt = [rng.randrange(2, 49152) for _ in range(rng.randint(4, 9))]
        response = [rng.randrange(2, 49152) for _ in range(rng.randint(2, 7))]
        rows.append(RolloutRow(
            id=f"{i}", step=1, prompt_id=f"p{i}", sample=0, prompt_type="general", prompt="q",
            response="r", prompt_token_ids=prompt, response_token_ids=response,
            logprobs=[0.0] * len(response), policy_logprobs=[], ref_logprobs=[], values=[],
            advantages=[], returns=[], principles=[], score=rng.uniform(-1, 1), reward=0.0,
            finished=True))
    return RolloutRow.to_table(rows)


def _max_gap(a, b):
    return max(abs(x - y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True))


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "model.safetensors"))


def test_group_update_equals_the_one_process_update(ray_local, tiny_model, tmp_path):
    import ray

    from dromedary_ray.runtime.ppo import loop as L

    cfg = _cfg()
    torch_trainer = L.start_trainer(tiny_model, cfg, ENGINE, None, str(tmp_path / "sync-t"))
    # 2 rows per rank per minibatch, accumulated one by one
    group = L.start_trainer(tiny_model, _cfg(trainer="deepspeed", trainer_workers=2,
                                             micro_batch_size=1),
                            ENGINE, None, str(tmp_path / "sync-d"))
    try:
        rollouts = _rollouts()
        columns = {}
        for name in ("policy_logprobs", "ref_logprobs", "values"):
            ours, theirs = ray.get([getattr(t, name).remote(rollouts)
                                    for t in (group, torch_trainer)])
            assert _max_gap(ours, theirs) < 1e-5, name
            columns[name] = theirs
        for name, values in columns.items():
            rollouts = L.with_column(rollouts, name, values)
        rollouts = L.with_column(rollouts, "logprobs", columns["policy_logprobs"])
        rollouts, _ = L.advantages(cfg, rollouts)

        ours, theirs = ray.get([t.update.remote(rollouts, 1) for t in (group, torch_trainer)])
        print({k: (round(ours[k], 6), round(theirs[k], 6)) for k in sorted(theirs)})
        for key in ("policy_loss", "value_loss", "clip_fraction", "approx_kl", "entropy",
                    "policy_grad_norm", "value_grad_norm"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-6), key
        assert theirs["clip_fraction"] > 0  # the second epoch moved far enough to clip

        after = ray.get([t.policy_logprobs.remote(rollouts) for t in (group, torch_trainer)])
        assert _max_gap(*after) < 1e-4
        assert _max_gap(after[1], columns["policy_logprobs"]) > 1e-2  # the policy did move
        folders = [str(tmp_path / "group"), str(tmp_path / "torch")]
        ray.get([t.save_pretrained.remote(f) for t, f in zip((group, torch_trainer), folders,
                                                              strict=True)])
        group_w, torch_w = (_weights(f) for f in folders)
        base = _weights(tiny_model)
        assert set(group_w) == set(torch_w)
        moved = max(float((torch_w[k] - base[k]).abs().max()) for k in torch_w)
        gaps = {k: float((group_w[k] - torch_w[k]).abs().max()) for k in torch_w}
        print(f"largest update {moved:.2e}, largest gap {max(gaps.values()):.2e}")
        # Summation order differs (micro-batches, the all-reduce); Adam divides by sqrt(v),
        # so a weight whose gradients are near zero shows that noise at lr scale. Four steps
        # of lr 1e-3 move weights by up to ~4e-3; the two runs agree to ~1% of that.
        assert moved > 1e-3
        assert max(gaps.values()) < 0.02 * moved, sorted(gaps.items(), key=lambda kv: -kv[1])[:3]
    finally:
        ray.kill(group)
        ray.kill(torch_trainer)


def test_micro_batches_give_the_whole_minibatch_update(tiny_model, tmp_path):
    """The one-process trainer (no Ray needed: a plain class) accumulating one row at a time
    makes the update it makes on whole minibatches: the same losses and weights."""
    from dromedary_ray.runtime.ppo import loop as L
    from dromedary_ray.runtime.ppo.trainer import PPOTrainer

    cfg = _cfg()
    whole, by_row = (PPOTrainer(tiny_model, c, engine=ENGINE)
                     for c in (cfg, _cfg(micro_batch_size=1)))
    rollouts = _rollouts()
    for name in ("policy_logprobs", "ref_logprobs", "values"):
        assert _max_gap(getattr(whole, name)(rollouts), getattr(by_row, name)(rollouts)) < 1e-5
        rollouts = L.with_column(rollouts, name, getattr(whole, name)(rollouts))
    rollouts = L.with_column(rollouts, "logprobs", rollouts["policy_logprobs"].to_pylist())
    rollouts, _ = L.advantages(cfg, rollouts)
    a, b = whole.update(rollouts, 1), by_row.update(rollouts, 1)
    assert a.keys() == b.keys()
    for key in a:
        assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    # Compared as whole-update norms: summation order differs per micro-batch, and Adam divides
    # by sqrt(v), so a weight whose gradient is near zero can differ elementwise at lr scale
    # (4% of the largest element was seen once) while the update as a whole agrees.
    import torch

    start = PPOTrainer(tiny_model, cfg, engine=ENGINE).policy
    with torch.no_grad():
        pairs = list(zip(whole.policy.parameters(), by_row.policy.parameters(),
                         start.parameters(), strict=True))
        moved = torch.sqrt(sum(((a - w0) ** 2).sum() for a, _, w0 in pairs)).item()
        gap = torch.sqrt(sum(((a - b) ** 2).sum() for a, b, _ in pairs)).item()
    print(f"update norm {moved:.3e}, gap norm {gap:.3e}")
    assert moved > 1e-2 and gap < 0.01 * moved, (moved, gap)


@pytest.mark.parametrize("trainer,lora", [("deepspeed", False), ("torch", True),
                                          ("deepspeed", True)],
                         ids=["deepspeed-full", "torch-lora", "deepspeed-lora"])
def test_engine_scores_tokens_as_the_trainer_after_a_sync(ray_local, tiny_model, tmp_path,
                                                          trainer, lora):
    import ray

    from dromedary_ray.data.schemas import PromptRow
    from dromedary_ray.data.store import StageStore
    from dromedary_ray.runtime.ppo import loop as L
    from dromedary_ray.salmon_principles import load_salmon_principles

    group = dict(trainer_workers=2) if trainer == "deepspeed" else {}
    cfg = _cfg(prompts_per_step=4, mini_batch_size=2, trainer=trainer,
               learning_rate=1e-2 if lora else 1e-3,  # a fresh adapter starts at zero
               lora=PPOLoRAConfig(rank=8, alpha=16) if lora else None, **group)
    prompts = [PromptRow(f"p{i}", "seed", q) for i, q in enumerate(
        ["Name a prime number.", "Why is the sky blue?", "Write a haiku.", "What is 2 + 2?"])]
    actors = L.start_actors(tiny_model, lambda p, r, t: [float(len(x)) for x in t], cfg,
                            ENGINE, None, sync_dir=str(tmp_path / "sync"))
    try:
        loop = L.Loop(prompts, load_salmon_principles(cfg.principles_file), cfg, actors,
                      StageStore(str(tmp_path), "ppo"))
        rollouts, stats = L.advantages(cfg, L.reference(loop, L.score(loop, L.generate(loop, 1))))
        assert stats["rollout_logprob_gap"] < 1e-4  # engine and trainer agree before the update
        trainer_h, engine = actors.trainer, actors.rollouts[0]
        ray.get(trainer_h.update.remote(rollouts, 1))
        seconds = L.sync_weights(actors, 1, cfg)
        health = ray.get(engine.health.remote())
        assert health["weights_version"] == 1 and (health["adapter"] is not None) == lora

        # The engine samples with the new weights: its log-probs of what it sampled equal the
        # trainer's for those tokens, and differ from the reference's (the SFT model's).
        fresh = L.reference(loop, L.generate(loop, 2))
        sampled, ref = (fresh[k].to_pylist() for k in ("logprobs", "ref_logprobs"))
        trainer_now = fresh["policy_logprobs"].to_pylist()
        print(f"{trainer} lora={lora}: sync {seconds:.2f}s, "
              f"gap {_max_gap(sampled, trainer_now):.2e}, moved {_max_gap(sampled, ref):.2e}")
        assert _max_gap(sampled, trainer_now) < 1e-4
        assert _max_gap(sampled, ref) > 1e-3
        if not lora:  # prompt log-probs under LoRA are broken in vLLM (rollout.token_logprobs)
            same = ray.get(engine.token_logprobs.remote(
                rollouts["prompt_token_ids"].to_pylist(),
                rollouts["response_token_ids"].to_pylist()))
            assert _max_gap(same, ray.get(trainer_h.policy_logprobs.remote(rollouts))) < 1e-4
    finally:
        L.stop_actors(actors)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_group_runs_the_loop_checkpoints_and_resumes(ray_local, tiny_model, tmp_path, lora):
    """run_ppo with the group: steps run and log, a checkpoint (every rank's ZeRO partitions)
    is resumed by a longer run, and the final policy is a plain Hugging Face folder."""
    import json

    from transformers import AutoModelForCausalLM

    from dromedary_ray.data.schemas import PromptRow
    from dromedary_ray.data.store import StageStore
    from dromedary_ray.runtime.ppo.loop import STEPS_FILE, run_ppo

    prompts = [PromptRow(f"p{i}", "seed", f"Question {i}?") for i in range(4)]
    cfg = _cfg(prompts_per_step=2, mini_batch_size=2, ppo_epochs=1, checkpoint_every_steps=1,
               trainer="deepspeed", trainer_workers=2,
               lora=PPOLoRAConfig(rank=4, alpha=8) if lora else None)

    def run(steps):
        return run_ppo(prompts, policy_path=tiny_model,
                       reward=lambda p, r, t: [float(len(x)) for x in t],
                       cfg=dataclasses.replace(cfg, steps=steps), engine=ENGINE,
                       store=StageStore(str(tmp_path), "ppo"))

    first = run(1)
    assert first.steps_run == 1
    second = run(2)
    assert (second.resumed_from_step, second.steps_run) == (1, 1)
    lines = [json.loads(x) for x in (tmp_path / "ppo" / STEPS_FILE).read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2]
    assert all(x["rollout_logprob_gap"] < 1e-4 for x in lines)  # the resumed sync arrived too
    print(f"lora={lora}: s/step {[round(x['seconds_step'], 2) for x in lines]}, "
          f"update {[round(x['seconds_update'], 2) for x in lines]}")
    model = AutoModelForCausalLM.from_pretrained(second.model_dir)  # merged: no peft needed
    assert not any("lora" in name for name, _ in model.named_parameters())
