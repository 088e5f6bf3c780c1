"""The pure parts of the PPO stage: advantages from rollouts, draws, schema, checkpoints,
config. Milliseconds; no Ray, no models."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from dromedary_ray.algos import ppo, rl
from dromedary_ray.config import PPOConfig, SamplingConfig, load_config
from dromedary_ray.data.salmon_schemas import RolloutRow
from dromedary_ray.errors import ConfigError, DromedaryError
from dromedary_ray.runtime.ppo import checkpoint as ckpt
from dromedary_ray.salmon_principles import load_salmon_principles


def _rollouts(seed: int, batch: int = 6, steps: int = 7):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, steps + 1, (batch,), generator=g).tolist()
    mask = ppo.length_mask(lengths, steps)
    logprobs = -torch.rand(batch, steps, generator=g) * mask
    ref = -torch.rand(batch, steps, generator=g) * mask
    values = torch.randn(batch, steps, generator=g) * mask
    scores = torch.randn(batch, generator=g)
    finished = torch.rand(batch, generator=g) > 0.3
    return lengths, mask, logprobs, ref, values, scores, finished


def test_pad_unpad_round_trip():
    rows = [[1.0, 2.0], [], [3.0, 4.0, 5.0]]
    padded = ppo.pad_right(rows)
    assert padded.shape == (3, 3)
    assert ppo.unpad(padded, [2, 0, 3]) == rows
    assert ppo.length_mask([2, 0, 3]).tolist() == [[1, 1, 0], [0, 0, 0], [1, 1, 1]]
    with pytest.raises(ValueError, match="over the width"):
        ppo.pad_right(rows, width=2)


def test_gae_advantages_match_the_hand_composition_with_the_loop_reference():
    cfg = PPOConfig(kl_coef=0.05, gamma=0.99, lam=0.9, whiten_advantages=False)
    lengths, mask, lp, ref, values, scores, finished = _rollouts(0)
    out = ppo.compute_advantages(cfg, scores, lp, ref, mask, finished, values)
    shaped = scores + torch.clamp(cfg.length_bonus_per_token * torch.tensor(lengths).float(),
                                  max=cfg.max_bonus) - 6.0 * (~finished).float()
    torch.testing.assert_close(out.rewards, shaped)
    rewards = -0.05 * (lp - ref) * mask
    for b, n in enumerate(lengths):
        rewards[b, n - 1] += shaped[b]
    adv, ret = rl.gae_advantages_loop(rewards.double(), values.double(), mask.double(), 0.99,
                                      0.9)
    torch.testing.assert_close(out.advantages.double(), adv, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.returns.double(), ret, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.kl, ((lp - ref) * mask).sum(-1))


def test_gae_whitening_gives_zero_mean_unit_variance_over_tokens():
    lengths, mask, lp, ref, values, scores, finished = _rollouts(1)
    out = ppo.compute_advantages(PPOConfig(), scores, lp, ref, mask, finished, values)
    picked = out.advantages[mask.bool()]
    assert abs(float(picked.mean())) < 1e-5 and abs(float(picked.std()) - 1) < 1e-4
    assert (out.advantages[~mask.bool()] == 0).all()
    with pytest.raises(ValueError, match="values"):
        ppo.compute_advantages(PPOConfig(), scores, lp, ref, mask, finished, None)


def test_rloo_is_leave_one_out_of_the_kl_penalised_sequence_reward():
    cfg = PPOConfig(advantage="rloo", samples_per_prompt=3, prompts_per_step=2,
                    mini_batch_size=2, kl_coef=0.1)
    lengths, mask, lp, ref, _, scores, finished = _rollouts(2)
    out = ppo.compute_advantages(cfg, scores, lp, ref, mask, finished)
    seq = out.rewards - 0.1 * ((lp - ref) * mask).sum(-1)
    for b in range(6):
        group = range(b // 3 * 3, b // 3 * 3 + 3)
        baseline = sum(float(seq[o]) for o in group if o != b) / 2
        expected = float(seq[b]) - baseline
        assert torch.allclose(out.advantages[b, :lengths[b]], torch.tensor(expected), atol=1e-5)
    assert out.returns is None


def test_group_advantages_are_normalised_within_each_prompt():
    cfg = PPOConfig(advantage="group", samples_per_prompt=3, prompts_per_step=2,
                    mini_batch_size=3)
    lengths, mask, lp, ref, _, scores, finished = _rollouts(3)
    out = ppo.compute_advantages(cfg, scores, lp, ref, mask, finished)
    per_seq = torch.stack([out.advantages[b, 0] for b in range(6)]).view(2, 3)
    assert torch.allclose(per_seq.sum(-1), torch.zeros(2), atol=1e-5)


def test_step_prompts_are_deterministic_permutations_per_epoch():
    first = [ppo.step_prompt_indices(5, 2, s, seed=0) for s in (1, 2, 3, 4, 5)]
    assert first == [ppo.step_prompt_indices(5, 2, s, seed=0) for s in (1, 2, 3, 4, 5)]
    flat = sum(first, [])
    assert sorted(flat[:5]) == list(range(5)) and sorted(flat[5:10]) == list(range(5))
    assert flat != sum((ppo.step_prompt_indices(5, 2, s, seed=1) for s in (1, 2, 3, 4, 5)), [])


def test_rollout_principles_draw_k_plus_every_intervention_reproducibly():
    pset = load_salmon_principles("principles/salmon.yaml")
    cfg = PPOConfig()
    kind, drawn = ppo.rollout_principles(pset, "How do I bake bread?", "p1", 3, cfg)
    assert kind == "general" or kind in pset.prompt_types
    assert len(drawn) == 3 + len(pset.interventions)
    assert drawn[3:] == list(pset.interventions)
    assert len({p.name for p in drawn}) == len(drawn)
    again = ppo.rollout_principles(pset, "How do I bake bread?", "p1", 3, cfg)
    assert again == (kind, drawn)
    steps = {tuple(p.name for p in ppo.rollout_principles(pset, "x", "p1", s, cfg)[1][:3])
             for s in range(1, 10)}
    assert len(steps) > 1  # re-drawn each step
    no_iv = ppo.rollout_principles(pset, "x", "p1", 3,
                                   dataclasses.replace(cfg, use_interventions=False))[1]
    assert len(no_iv) == 3


def test_minibatches_and_seeds():
    mbs = ppo.minibatches(10, 4, seed=0, step=1, epoch=0)
    assert sorted(sum(mbs, [])) == list(range(10)) and [len(m) for m in mbs] == [4, 4, 2]
    assert mbs != ppo.minibatches(10, 4, seed=0, step=1, epoch=1)
    assert ppo.sample_seed(0, 1, "a", 0) == ppo.sample_seed(0, 1, "a", 0)
    assert ppo.sample_seed(0, 1, "a", 0) != ppo.sample_seed(0, 1, "a", 1)


def test_rollout_row_round_trips_through_arrow():
    row = RolloutRow(id="000001/0000/p/0", step=1, prompt_id="p", sample=0,
                     prompt_type="general", prompt="q", response="a",
                     prompt_token_ids=[1, 2], response_token_ids=[3, 4],
                     logprobs=[-0.5, -0.25], policy_logprobs=[-0.5, -0.25],
                     ref_logprobs=[-0.5, -0.25], values=[], advantages=[0.5, 0.25],
                     returns=[], principles=["Helpful"], score=1.5, reward=1.0, finished=True)
    table = RolloutRow.to_table([row])
    assert table.schema == RolloutRow.SCHEMA
    assert RolloutRow.from_table(table) == [row]


def test_ppo_config_validates_by_raising():
    for bad in (["ppo.advantage=rloo"], ["ppo.mini_batch_size=5"],
                ["ppo.sampling.temperature=0"], ["ppo.sampling.n=2"], ["ppo.kl_estimator=k4"],
                ["ppo.unfinished_penalty=-1"], ["ppo.value_init=rm"]):
        with pytest.raises(ConfigError, match=r"^ppo\."):
            load_config(None, bad)
    cfg = load_config(None, ["ppo.advantage=group", "ppo.samples_per_prompt=4",
                             "ppo.max_bonus=null"]).ppo
    assert cfg.max_bonus is None and cfg.sampling == SamplingConfig(temperature=1.0, top_p=1.0,
                                                                    max_new_tokens=512)


def test_checkpoints_are_atomic_fingerprinted_and_never_run_zero_steps_silently(tmp_path):
    root = tmp_path / "checkpoints"
    assert ckpt.latest_checkpoint(root, "fp") is None
    def saver(step):
        return lambda folder: (Path(folder) / "trainer.pt").write_text(str(step))

    for step in (2, 4, 6):
        ckpt.write_checkpoint(root, step, "fp", saver(step))
    (root / "step-000008.tmp-dead").mkdir()  # a save that crashed half-way
    latest = ckpt.latest_checkpoint(root, "fp")
    assert latest.step == 6 and (latest.path / "trainer.pt").read_text() == "6"
    assert sorted(p.name for p in root.glob("step-0*") if ".tmp" not in p.name) == [
        "step-000004", "step-000006"]
    assert ckpt.resume_step(latest, 10) == 6
    assert ckpt.resume_step(latest, 6) == 6  # the caller finishes from it, saying so
    with pytest.raises(DromedaryError, match="past ppo.steps=5"):
        ckpt.resume_step(latest, 5)
    with pytest.raises(DromedaryError, match="other prompts"):
        ckpt.latest_checkpoint(root, "other")
    assert json.loads((latest.path / "state.json").read_text())["step"] == 6


def test_step_log_drops_lines_after_the_resumed_checkpoint(tmp_path):
    from dromedary_ray.runtime.ppo.loop import STEPS_FILE, StepLog

    row = {"reward_mean": 0.0, "kl": 0.0, "response_length": 1.0, "seconds_step": 0.1}
    log = StepLog(tmp_path, 0)
    for step in (1, 2, 3):
        log.write({"step": step, **row})
    log.close()
    log = StepLog(tmp_path, 2)
    log.write({"step": 3, **row, "kl": 9.0})
    log.close()
    lines = [json.loads(x) for x in (tmp_path / STEPS_FILE).read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3] and lines[-1]["kl"] == 9.0


def test_shaped_rewards_use_salmons_numbers():
    cfg = PPOConfig()
    mask = ppo.length_mask([512, 100])
    out = ppo.shaped_rewards(cfg, torch.zeros(2), mask, torch.tensor([False, True]))
    assert out.tolist() == pytest.approx([4.0 - 6.0, 100 * 5.0 / 512])
