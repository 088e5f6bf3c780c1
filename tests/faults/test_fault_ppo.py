"""The PPO stage under faults: its rollout actor, or its reward actor, SIGKILLed mid-step.

Each case kills the actor in step 3 of 4 (checkpoint at step 2), expects the run to stop with
our error naming the actor and the checkpoint, runs it again, and compares it with one
uninterrupted run: the rerun resumed from step 2 (not 0), every step is logged once, the
per-step rollout shards hold the reference's row ids (none twice, none lost) and rows, and the
final policy is the reference's. Two fast cases check the error's wording and which actor it
names.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from fault_helpers import logged_steps, raw_ids, rows_by_id
from ppo_run import run_ppo_script, script_result, write_script

STEPS, KILLED_STEP, CHECKPOINT = 4, 3, 2  # ppo_run's driver checkpoints every 2 steps


def final_weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run_dir / "ppo" / "model" / "model.safetensors")


@pytest.fixture(scope="module")
def ppo_driver(ray_local, tmp_path_factory) -> tuple[Path, str]:
    import ray

    return (write_script(tmp_path_factory.mktemp("ppo_driver")),
            ray.get_runtime_context().gcs_address)


@pytest.fixture(scope="module")
def ppo_reference(ppo_driver, tiny_model, tmp_path_factory) -> Path:
    """One uninterrupted run of the driver, shared by both cases."""
    from safetensors.torch import load_file

    script, address = ppo_driver
    run_dir = tmp_path_factory.mktemp("ppo_reference") / "run"
    result = script_result(run_ppo_script(script, address, run_dir, tiny_model, STEPS))
    assert result["resumed_from_step"] == 0 and result["steps_run"] == STEPS
    # Every tensor moved from the tiny model's: the cases' equal weights are not "untrained".
    start, end = load_file(Path(tiny_model) / "model.safetensors"), final_weights(run_dir)
    assert start.keys() == end.keys() and not any(start[k].equal(end[k]) for k in end)
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("actor, point", [("rollout", "rollout_generate"),
                                          ("reward", "reward_score")])
def test_ppo_actor_killed_mid_step_resumes_from_checkpoint(actor, point, ppo_driver,
                                                           ppo_reference, tiny_model, tmp_path):
    script, address = ppo_driver
    run_dir, marker = tmp_path / "run", tmp_path / "fired"
    stage = run_dir / "ppo"
    # Each actor's generate / score runs once per step: its 3rd call is step 3's.
    killed = run_ppo_script(script, address, run_dir, tiny_model, STEPS,
                            fault=f"{point}:{KILLED_STEP}:{marker}")
    assert marker.exists(), "the fault hook never fired: the case proved nothing"
    assert killed.returncode == 2, killed.stderr[-3000:]
    (error,) = [x for x in killed.stderr.splitlines() if x.startswith("error: ")]
    assert error == (f"error: stage ppo: the {actor} actor died during step {KILLED_STEP}; "
                     f"nothing of step {KILLED_STEP} was kept. Run the stage again to resume "
                     f"from the checkpoint at step {CHECKPOINT}")
    # Nothing of the unfinished step counts as finished: no log line, no shard, no checkpoint.
    assert logged_steps(stage / "ppo_steps.jsonl") == [1, 2]
    assert sorted(p.name for p in (stage / "data").glob("*.parquet")) == [
        "step-000001.parquet", "step-000002.parquet"]
    assert [p.name for p in (stage / "checkpoints").glob("step-*")] == ["step-000002"]
    assert not (stage / "model").exists()

    resumed = script_result(run_ppo_script(script, address, run_dir, tiny_model, STEPS))
    assert resumed["resumed_from_step"] == CHECKPOINT and resumed["steps_run"] == 2
    assert logged_steps(stage / "ppo_steps.jsonl") == [1, 2, 3, 4]

    # The rollouts, read as plain Parquet: the reference's ids, none twice, none lost.
    ids, want = raw_ids(stage / "data"), raw_ids(ppo_reference / "ppo" / "data")
    assert len(ids) == len(set(ids)), "a rollout row was written twice"
    assert sorted(ids) == sorted(want) and len(want) == STEPS * 2
    # Deterministic across the resume: per-request sampling seeds, the checkpoint's weights
    # synced to a fresh engine, and the trainer's optimizer and RNG states restored.
    assert rows_by_id(stage / "data") == rows_by_id(ppo_reference / "ppo" / "data")
    got, ref = final_weights(run_dir), final_weights(ppo_reference)
    assert got.keys() == ref.keys()
    assert all(got[k].equal(ref[k]) for k in ref)


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
