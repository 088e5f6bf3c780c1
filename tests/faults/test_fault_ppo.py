"""The PPO stage under faults: its rollout actor, its reward actor (a programmatic reward, or
a reward model on vLLM's pooling runner beside two rollout engines), or its trainer (the
one-process trainer, or one rank of a 2-rank DeepSpeed ZeRO-3 group) SIGKILLed mid-step.

Each case kills the actor in step 3 of 4 (checkpoint at step 2), expects the run to stop with
our error naming the actor and the checkpoint, runs it again, and compares it with one
uninterrupted run with the same trainer and reward: the rerun resumed from step 2 (not 0),
every step is logged once, the per-step rollout shards hold the reference's row ids (none
twice, none lost) and rows, and the final policy is the reference's. Two more hang the rollout
or the reward actor in step 3 (`DROMEDARY_HANG`) under a short `ppo.call_timeout_s`: the run
ends with our error within the limit, keeps nothing of step 3, leaves no actor behind, and a
rerun without the hang resumes from step 2. Fast cases check the errors' wording and which
actor they name.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fault_helpers import logged_steps, raw_ids, rows_by_id, wait_for
from ppo_run import run_ppo_script, script_result, write_script

STEPS, KILLED_STEP, CHECKPOINT = 4, 3, 2  # ppo_run's driver checkpoints every 2 steps
HUNG_LIMIT = 20  # ppo.call_timeout_s of the hung runs: a tiny step's calls take ~1 s


def final_weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run_dir / "ppo" / "model" / "model.safetensors")


@pytest.fixture(scope="module")
def ppo_driver(ray_local, tmp_path_factory) -> tuple[Path, str]:
    import ray

    return (write_script(tmp_path_factory.mktemp("ppo_driver")),
            ray.get_runtime_context().gcs_address)


@pytest.fixture(scope="module")
def ppo_reference(ppo_driver, tiny_model, tmp_path_factory):
    """`reference(trainer, reward_model)`: one uninterrupted run of the driver per trainer and
    reward, made on first use and shared by the cases that use them."""
    from safetensors.torch import load_file

    script, address = ppo_driver
    made: dict[tuple[str, str | None], Path] = {}

    def reference(trainer: str, reward_model: str | None) -> Path:
        key = (trainer, reward_model)
        if key not in made:
            name = f"ppo_reference_{trainer}{'_rm' if reward_model else ''}"
            run_dir = tmp_path_factory.mktemp(name) / "run"
            result = script_result(run_ppo_script(script, address, run_dir, tiny_model, STEPS,
                                                  trainer=trainer, reward_model=reward_model))
            assert result["resumed_from_step"] == 0 and result["steps_run"] == STEPS
            # Every tensor moved from the tiny model's: equal weights are not "untrained".
            start, end = load_file(Path(tiny_model) / "model.safetensors"), final_weights(run_dir)
            assert start.keys() == end.keys() and not any(start[k].equal(end[k]) for k in end)
            made[key] = run_dir
        return made[key]

    return reference


@pytest.mark.slow
@pytest.mark.parametrize("actor, point, trainer, again_on_resume, with_rm", [
    ("rollout", "rollout_generate", "torch", False, False),
    ("reward", "reward_score", "torch", False, False),
    # the reward model's vLLM pooling engine dies with its actor; two rollout engines run on
    ("reward", "reward_score", "torch", False, True),
    # and once more while the rerun loads the checkpoint, before its first step
    ("trainer", "trainer_update", "torch", True, False),
    # one rank dies; the other must not hang
    ("trainer", "trainer_update", "deepspeed", False, False),
], ids=["rollout", "reward", "reward-model", "trainer", "deepspeed-rank"])
def test_ppo_actor_killed_mid_step_resumes_from_checkpoint(actor, point, trainer,
                                                           again_on_resume, with_rm, request,
                                                           ppo_driver, ppo_reference, tiny_model,
                                                           tmp_path):
    rm = request.getfixturevalue("tiny_reward_model") if with_rm else None
    reference = ppo_reference(trainer, rm)
    script, address = ppo_driver
    run_dir, marker = tmp_path / "run", tmp_path / "fired"
    stage = run_dir / "ppo"
    # Each actor's generate / score / update runs once per step: its 3rd call is step 3's.
    killed = run_ppo_script(script, address, run_dir, tiny_model, STEPS,
                            fault=f"{point}:{KILLED_STEP}:{marker}", trainer=trainer,
                            reward_model=rm)
    assert marker.exists(), "the fault hook never fired: the case proved nothing"
    assert killed.returncode == 2, killed.stderr[-3000:]
    (error,) = [x for x in killed.stderr.splitlines() if x.startswith("error: ")]
    assert error == (f"error: stage ppo: the {actor} actor died during step {KILLED_STEP}; "
                     f"nothing of step {KILLED_STEP} was kept. Run the stage again to resume "
                     f"from the checkpoint at step {CHECKPOINT}")
    # Nothing of the unfinished step counts as finished: no log line, no shard, no checkpoint.
    assert_nothing_of_step_3_kept(stage)

    if again_on_resume:
        second = tmp_path / "fired-on-load"
        lost = run_ppo_script(script, address, run_dir, tiny_model, STEPS,
                              fault=f"trainer_load:1:{second}", trainer=trainer, reward_model=rm)
        assert second.exists() and lost.returncode == 2, lost.stderr[-3000:]
        (error,) = [x for x in lost.stderr.splitlines() if x.startswith("error: ")]
        assert error == (f"error: stage ppo: the trainer actor died while resuming from the "
                         f"checkpoint at step {CHECKPOINT}; no finished step was lost. Run the "
                         f"stage again to resume from the checkpoint at step {CHECKPOINT}")
        assert logged_steps(stage / "ppo_steps.jsonl") == [1, 2]

    resumed = script_result(run_ppo_script(script, address, run_dir, tiny_model, STEPS,
                                           trainer=trainer, reward_model=rm))
    assert resumed["resumed_from_step"] == CHECKPOINT and resumed["steps_run"] == 2
    assert logged_steps(stage / "ppo_steps.jsonl") == [1, 2, 3, 4]

    # The rollouts, read as plain Parquet: the reference's ids, none twice, none lost.
    ids, want = raw_ids(stage / "data"), raw_ids(reference / "ppo" / "data")
    assert len(ids) == len(set(ids)), "a rollout row was written twice"
    assert sorted(ids) == sorted(want) and len(want) == STEPS * 2
    # Deterministic across the resume: per-request sampling seeds, the checkpoint's weights
    # synced to a fresh engine, and the trainer's optimizer and RNG states restored.
    assert rows_by_id(stage / "data") == rows_by_id(reference / "ppo" / "data")
    got, ref = final_weights(run_dir), final_weights(reference)
    assert got.keys() == ref.keys()
    assert all(got[k].equal(ref[k]) for k in ref)


def assert_nothing_of_step_3_kept(stage: Path) -> None:
    """No log line, shard or checkpoint of the unfinished step; no final model."""
    assert logged_steps(stage / "ppo_steps.jsonl") == [1, 2]
    assert sorted(p.name for p in (stage / "data").glob("*.parquet")) == [
        "step-000001.parquet", "step-000002.parquet"]
    assert [p.name for p in (stage / "checkpoints").glob("step-*")] == ["step-000002"]
    assert not (stage / "model").exists()


def live_actor_processes(cls: str) -> list[int]:
    """This test session's Ray workers (descendants of the raylet it started) running `cls`."""
    import psutil

    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if " ".join(proc.cmdline()).startswith(f"ray::{cls}"):
                found.append(proc.pid)
        except psutil.NoSuchProcess:
            continue
    return found


@pytest.mark.slow
@pytest.mark.parametrize("actor, point, cls", [
    ("rollout", "rollout_generate", "RolloutActor"),
    ("reward", "reward_score", "RewardActor"),
], ids=["hung-rollout", "hung-reward"])
def test_ppo_actor_hung_mid_step_fails_within_the_deadline_and_resumes(actor, point, cls,
                                                                      ppo_driver, tiny_model,
                                                                      tmp_path):
    script, address = ppo_driver
    run_dir = tmp_path / "run"
    stage = run_dir / "ppo"
    started = time.monotonic()
    # Its 3rd call (step 3's) blocks for an hour: an engine that never answers.
    hung = run_ppo_script(script, address, run_dir, tiny_model, STEPS,
                          hang=f"{point}:3600:{KILLED_STEP}", call_timeout_s=HUNG_LIMIT)
    elapsed = time.monotonic() - started
    assert hung.returncode == 2, hung.stderr[-3000:]
    (error,) = [x for x in hung.stderr.splitlines() if x.startswith("error: ")]
    assert error == (f"error: stage ppo: the {actor} actor did not answer within "
                     f"ppo.call_timeout_s = {HUNG_LIMIT} s during step {KILLED_STEP} and was "
                     f"stopped; nothing of step {KILLED_STEP} was kept. Run the stage again to "
                     f"resume from the checkpoint at step {CHECKPOINT} (raise ppo.call_timeout_s "
                     "if such calls are legitimately slower)")
    assert elapsed < 240, elapsed  # start-up, two steps and the limit; not the hour
    assert_nothing_of_step_3_kept(stage)
    # The hung actor was stopped, not left asleep in its call holding an engine's CPUs.
    wait_for(lambda: not live_actor_processes(cls), 30, f"the hung {cls} to end")

    # The default deadline on the rerun: the checkpoint still matches (deadlines are not
    # part of the run's fingerprint), so it resumes rather than starting again.
    resumed = script_result(run_ppo_script(script, address, run_dir, tiny_model, STEPS))
    assert resumed["resumed_from_step"] == CHECKPOINT and resumed["steps_run"] == 2
    assert logged_steps(stage / "ppo_steps.jsonl") == [1, 2, 3, 4]
    ids = raw_ids(stage / "data")
    assert len(ids) == len(set(ids)) == STEPS * 2, "a rollout row lost or written twice"


class _Handle:
    def __init__(self, hex_id: str):
        self._actor_id = type("ActorID", (), {"hex": lambda _: hex_id})()


def test_actor_role_names_the_dead_actor_from_rays_actor_id():
    from dromedary_ray.runtime.ppo.loop import Actors, actor_role

    one = Actors([_Handle("r0")], _Handle("rm"), _Handle("tr"))
    assert [actor_role(one, i) for i in ("r0", "rm", "tr")] == ["rollout", "reward", "trainer"]
    two = Actors([_Handle("r0"), _Handle("r1")], None, _Handle("tr"))
    assert actor_role(two, "r1") == "rollout 1"
    assert actor_role(two, "a DeepSpeed rank") == actor_role(two, None) == "trainer"


def test_actor_lost_error_says_where_a_rerun_resumes():
    from dromedary_ray.errors import ActorLostError, StageError

    err = ActorLostError("ppo", "reward", 1, 0)
    assert isinstance(err, StageError)
    assert (err.actor, err.step, err.resume_step) == ("reward", 1, 0)
    assert str(err).endswith("resume from step 0 (no checkpoint was written yet)")
    last = ActorLostError("ppo", "trainer", 16, 16, phase="while writing the final model")
    assert str(last) == ("stage ppo: the trainer actor died while writing the final model; no "
                         "finished step was lost. Run the stage again to resume from the "
                         "checkpoint at step 16")


def test_a_late_call_becomes_an_error_naming_actor_step_setting_and_checkpoint():
    from dromedary_ray.runtime.ppo.loop import (
        Actors,
        ActorTimeoutError,
        CallTimedOut,
        actor_deaths,
    )

    actors = Actors([_Handle("r0"), _Handle("r1")], _Handle("rm"), _Handle("tr"))
    with pytest.raises(ActorTimeoutError) as mid_step:
        with actor_deaths(actors, 3, 2):
            raise CallTimedOut("rollout 1", "call_timeout_s", 20.0)
    assert str(mid_step.value) == (
        "stage ppo: the rollout 1 actor did not answer within ppo.call_timeout_s = 20 s during "
        "step 3 and was stopped; nothing of step 3 was kept. Run the stage again to resume "
        "from the checkpoint at step 2 (raise ppo.call_timeout_s if such calls are "
        "legitimately slower)")
    assert (mid_step.value.actor, mid_step.value.step, mid_step.value.resume_step,
            mid_step.value.setting) == ("rollout 1", 3, 2, "call_timeout_s")
    with pytest.raises(ActorTimeoutError, match=(
            r"^stage ppo: the trainer actor did not answer within ppo.update_timeout_s = 3600 s "
            r"while writing the final model and was stopped; no finished step was lost\. ")):
        with actor_deaths(actors, 4, 4, phase="while writing the final model"):
            raise CallTimedOut("trainer", "update_timeout_s", 3600.0)
