"""The PPO driver loop: generate, score, reference, advantages, update, sync; each timed.

SALMON §3.3: the SFT policy samples responses; the principle-following reward model scores
each under principles drawn for its prompt's type plus every intervention principle; the
length bonus and unfinished penalty adjust the score; a per-token KL penalty against the SFT
model joins the reward; PPO updates policy and critic; the rollout engines take the new weights
in place. Every step appends one JSON line to `<stage>/ppo_steps.jsonl` (and TensorBoard scalars
to `<stage>/tensorboard/`) and writes its rollouts as one shard of the stage's data table.

Checkpoints (`checkpoint.py`) every `checkpoint_every_steps` steps and at the last step: a
killed run called again continues after the newest one. One at exactly `steps` finishes with
its saved policy and runs no step (the result's `steps_run` is 0, and a warning says so); one
past `steps` is refused. An actor that dies mid-step (rollout, reward or trainer) stops the
stage with `ActorLostError`, naming it, the step and the checkpoint a rerun resumes from; one
that does not answer within its deadline (`ppo.call_timeout_s`, `ppo.update_timeout_s`, or
`ppo.start_timeout_s` while the actors start) stops it with `ActorTimeoutError`, worded the
same, and is killed with the others so that nothing keeps the driver from exiting.
The final policy goes to `<stage>/model/` as a Hugging Face folder.

Launch (a local Ray cluster; `tests/test_ppo.py` has runnable variants)::

    from dromedary_ray.config import EngineConfig, PPOConfig, RayConfig
    from dromedary_ray.data.schemas import PromptRow
    from dromedary_ray.data.store import StageStore
    from dromedary_ray.runtime.cluster import connect
    from dromedary_ray.runtime.ppo.loop import run_ppo

    connect(RayConfig(num_cpus=4))
    result = run_ppo([PromptRow("p1", "seed", "Name a prime.")],
                     policy_path="runs/x/verbose_clone/model",
                     reward="runs/x/reward_model/model",  # or a function, see reward.RewardFn
                     cfg=PPOConfig(steps=20, prompts_per_step=8, mini_batch_size=4),
                     engine=EngineConfig(max_model_len=1024), store=StageStore("runs/x", "ppo"))
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from dromedary_ray.algos.ppo import (
    compute_advantages,
    length_mask,
    pad_right,
    rollout_principles,
    sample_seed,
    step_prompt_indices,
    step_stats,
    unpad,
)
from dromedary_ray.config import PPO_NOT_FINGERPRINTED, EngineConfig, PPOConfig, resolve_path
from dromedary_ray.data.salmon_schemas import RolloutRow
from dromedary_ray.data.schemas import PromptRow, RejectRow
from dromedary_ray.data.store import StageStore, file_digest
from dromedary_ray.errors import ActorLostError, StageError
from dromedary_ray.runtime.faults import maybe_die
from dromedary_ray.runtime.ppo.checkpoint import latest_checkpoint, resume_step, write_checkpoint
from dromedary_ray.runtime.ppo.reward import RewardFn
from dromedary_ray.runtime.ppo.rollout import RolloutRequest
from dromedary_ray.salmon_principles import SalmonPrincipleSet, load_salmon_principles

log = logging.getLogger(__name__)
STEPS_FILE = "ppo_steps.jsonl"
CHECKPOINTS = "checkpoints"
SYNC = "sync"  # weights or adapters the trainer writes for the engines (shared with them)


@dataclass(frozen=True)
class PPOResult:
    model_dir: str
    steps: int  # the configured total
    steps_run: int  # trained by this call (0 when it finished from a checkpoint at `steps`)
    resumed_from_step: int  # 0 for a fresh run
    seconds: float
    step_metrics: list[dict[str, float]] = field(default_factory=list)  # steps of this call


@dataclass
class Actors:
    rollouts: list[Any]  # RolloutActor handles (ppo.rollout_engines or engine.num_engines)
    reward: Any  # RewardActor handle, or None when only the trainer is needed
    trainer: Any  # PPOTrainer or ds_trainer.PPOTrainerGroup handle (the same calls)


@dataclass
class Loop:
    """What every step needs: the inputs, the config and the actors."""

    prompts: Sequence[PromptRow]
    pset: SalmonPrincipleSet
    cfg: PPOConfig
    actors: Actors
    store: StageStore


def run_ppo(prompts: Sequence[PromptRow], *, policy_path: str, reward: str | RewardFn,
            cfg: PPOConfig, engine: EngineConfig, store: StageStore,
            value_init_path: str | None = None) -> PPOResult:
    """Train `policy_path` with PPO on `prompts`; return where the policy went and the metrics.

    `reward`: a reward model folder or a `RewardFn`; `value_init_path`: the critic's starting
    weights (a sequence-classification folder, normally the reward model), None for the
    policy's. Ray must be connected.
    """
    started = time.perf_counter()
    stage_dir = Path(store.root)
    fp = run_fingerprint(prompts, policy_path, reward, value_init_path, cfg, engine)
    cfg = dataclasses.replace(cfg, principles_file=str(resolve_path(cfg.principles_file)))
    checkpoint = latest_checkpoint(stage_dir / CHECKPOINTS, fp)
    start = resume_step(checkpoint, cfg.steps)
    actors = start_actors(policy_path, reward, cfg, engine, value_init_path,
                          trainer_only=start == cfg.steps, sync_dir=str(stage_dir / SYNC))
    try:
        if checkpoint is not None:
            with actor_deaths(actors, start + 1, start,
                              phase=f"while resuming from the checkpoint at step {start}"):
                within(actors, [actors.trainer.load.remote(str(checkpoint.path))],
                       [actors.trainer], cfg, "update_timeout_s")
                log.warning("ppo: resuming from %s (step %d of %d)", checkpoint.path,
                            checkpoint.step, cfg.steps)
                if start == cfg.steps:
                    log.warning("ppo: the checkpoint is at the last step (%d): no step to run, "
                                "the final model is the checkpoint's policy", start)
                else:
                    sync_weights(actors, start, cfg)  # the engines start from the SFT weights
        loop = Loop(prompts, load_salmon_principles(cfg.principles_file), cfg, actors, store)
        metrics = train_steps(loop, start, stage_dir, fp)
        with actor_deaths(actors, cfg.steps, cfg.steps, phase="while writing the final model"):
            (model_dir,) = within(actors, [actors.trainer.save_pretrained.remote(store.model_dir)],
                                  [actors.trainer], cfg, "update_timeout_s")
    finally:
        stop_actors(actors)
    return PPOResult(model_dir, cfg.steps, len(metrics), start,
                     time.perf_counter() - started, metrics)


def train_steps(loop: Loop, start: int, stage_dir: Path, fp: str) -> list[dict[str, float]]:
    """Steps start+1 .. cfg.steps, each logged and checkpointed on schedule."""
    from tqdm import tqdm

    cfg, metrics = loop.cfg, []
    steps_log = StepLog(stage_dir, start)
    saved = start  # the newest checkpoint's step: where a rerun would resume
    bar = tqdm(total=cfg.steps, initial=start, desc="ppo", unit="step", dynamic_ncols=True)
    try:
        for step in range(start + 1, cfg.steps + 1):
            with actor_deaths(loop.actors, step, saved):
                row = ppo_step(step, loop)
                if step % cfg.checkpoint_every_steps == 0 or step == cfg.steps:
                    t0 = time.perf_counter()
                    write_checkpoint(stage_dir / CHECKPOINTS, step, fp,
                                     lambda f: save_trainer(loop, f))
                    row["seconds_checkpoint"] = time.perf_counter() - t0
                    saved = step
            steps_log.write(row)
            metrics.append(row)
            bar.update(1)
            bar.set_postfix(reward=f"{row['reward_mean']:.3f}", kl=f"{row['kl']:.4f}",
                            length=f"{row['response_length']:.0f}")
            maybe_die("ppo_step")  # fault tests: the driver dies after a finished step
    finally:
        bar.close()
        steps_log.close()
    return metrics


class ActorTimeoutError(StageError):
    """An actor of the PPO loop did not answer within its deadline during `step` (or during
    `phase`, between steps); worded like `ActorLostError`, with the setting to raise."""

    def __init__(self, actor: str, step: int, resume_step: int, setting: str, seconds: float,
                 phase: str | None = None):
        where = (f"the checkpoint at step {resume_step}" if resume_step
                 else "step 0 (no checkpoint was written yet)")
        when, kept = ((f"during step {step}", f"nothing of step {step} was kept")
                      if phase is None else (phase, "no finished step was lost"))
        super().__init__(
            f"stage ppo: the {actor} actor did not answer within ppo.{setting} = {seconds:g} s "
            f"{when} and was stopped; {kept}. Run the stage again to resume from {where} "
            f"(raise ppo.{setting} if such calls are legitimately slower)")
        self.actor, self.step, self.resume_step, self.setting = actor, step, resume_step, setting


class CallTimedOut(Exception):
    """`within`'s signal that an actor ran past a deadline; `actor_deaths` (which knows the
    step) turns it into ActorTimeoutError."""

    def __init__(self, role: str, setting: str, seconds: float):
        super().__init__(f"the {role} actor did not answer within ppo.{setting} = {seconds:g} s")
        self.role, self.setting, self.seconds = role, setting, seconds


def within(actors: Actors, refs: list[Any], handles: list[Any], cfg: PPOConfig,
           setting: str) -> list[Any]:
    """The results of `refs` (refs[i] computed by actor handles[i]), waiting at most
    `cfg.<setting>` seconds for all of them; past that, CallTimedOut naming the first late one.

    A hung engine or trainer blocks its caller with no error at all, so every wait of the loop
    on its actors goes through here. The late actor is not stopped here: `run_ppo` kills every
    actor on the way out, so a call stuck inside one cannot keep the driver from exiting.
    """
    import ray

    wait_all(actors, refs, handles, cfg, setting)
    return ray.get(refs) if refs else []


def wait_all(actors: Actors, refs: list[Any], handles: list[Any], cfg: PPOConfig,
             setting: str) -> None:
    """`within` without fetching the results (the trainer's weights stay where they are)."""
    import ray

    if not refs:
        return
    seconds = getattr(cfg, setting)
    ready, late = ray.wait(refs, num_returns=len(refs), timeout=seconds, fetch_local=False)
    if late:
        ray.get(ready)  # a dead actor's error first: its death, not a peer's wait, is the cause
        hung = handles[refs.index(late[0])]
        raise CallTimedOut(actor_role(actors, hung._actor_id.hex()), setting, seconds)


def save_trainer(loop: Loop, folder: str) -> None:
    """The trainer's whole state into `folder` (a checkpoint), within the update's deadline."""
    trainer = loop.actors.trainer
    within(loop.actors, [trainer.save.remote(folder)], [trainer], loop.cfg, "update_timeout_s")


@contextmanager
def actor_deaths(actors: Actors, step: int, saved: int,
                 phase: str | None = None) -> Iterator[None]:
    """Turn an actor's death during `step` (or during `phase`, between steps) into our
    `ActorLostError`, and a call past its deadline (`within`) into `ActorTimeoutError`, each
    naming the actor.

    Ray's own error names only an actor id, and nobody restarts the actor mid-step: its engine
    state and the trainer's are not worth rebuilding by hand when a checkpoint exists. Nothing
    of the step is kept as finished: its rollouts are written as its last phase and its log
    line and checkpoint after them; a rerun resumes from checkpoint `saved` and writes each
    redone step's shard again under the same name and row ids, replacing any earlier one.
    """
    import ray

    try:
        yield
    except ray.exceptions.RayActorError as err:
        # A DeepSpeed rank's death reaches us wrapped in the group actor's task error, which
        # may not carry the actor id: no id means "trainer" (actor_role).
        role = actor_role(actors, getattr(err, "actor_id", None))
        raise ActorLostError("ppo", role, step, saved, phase) from err
    except CallTimedOut as err:
        raise ActorTimeoutError(err.role, step, saved, err.setting, err.seconds,
                                phase) from None


def actor_role(actors: Actors, actor_id: str | None) -> str:
    """"rollout" (with its index when there are several), "reward" or "trainer"."""
    roles = {"reward": actors.reward, "trainer": actors.trainer}
    many = len(actors.rollouts) > 1
    roles.update({f"rollout {i}" if many else "rollout": a for i, a in enumerate(actors.rollouts)})
    for role, handle in roles.items():
        if handle is not None and handle._actor_id.hex() == actor_id:
            return role
    return "trainer"  # the only other actors are a DeepSpeed trainer's ranks


def ppo_step(step: int, loop: Loop) -> dict[str, float]:
    """One PPO step; returns its metrics (rollout stats, trainer stats, seconds per phase)."""
    timer = PhaseTimer()
    trainer = loop.actors.trainer
    with timer("generate"):
        rollouts = generate(loop, step)
    with timer("score"):
        rollouts = score(loop, rollouts)
    with timer("reference"):
        rollouts = reference(loop, rollouts)
    with timer("advantages"):
        rollouts, stats = advantages(loop.cfg, rollouts)
    with timer("update"):
        (trained,) = within(loop.actors, [trainer.update.remote(rollouts, step)], [trainer],
                            loop.cfg, "update_timeout_s")
        stats.update(trained)
    with timer("sync"):
        sync_weights(loop.actors, step, loop.cfg)
    with timer("write"):
        loop.store.write_shard(rollouts, RejectRow.empty(), f"step-{step:06d}")
    return {"step": step, **stats, **timer.seconds()}


# --- the phases ----------------------------------------------------------------------------


def generate(loop: Loop, step: int) -> pa.Table:
    """This step's prompts, each `samples_per_prompt` times, split across the rollout actors."""
    cfg, requests = loop.cfg, []
    for slot, i in enumerate(step_prompt_indices(len(loop.prompts), cfg.prompts_per_step, step,
                                                 cfg.seed)):
        p = loop.prompts[i]
        prompt_type, principles = rollout_principles(loop.pset, p.query, p.id, step, cfg)
        for g in range(cfg.samples_per_prompt):
            requests.append(RolloutRequest(
                id=f"{step:06d}/{slot:04d}/{p.id}/{g}", step=step, prompt_id=p.id, sample=g,
                prompt_type=prompt_type, prompt=p.query, principles=[x.name for x in principles],
                seed=sample_seed(cfg.seed, step, f"{slot}/{p.id}", g)))
    engines = loop.actors.rollouts
    share = -(-len(requests) // len(engines))  # ceil: contiguous shares keep groups adjacent
    chunks = [requests[k * share:(k + 1) * share] for k in range(len(engines))]
    busy = [(a, c) for a, c in zip(engines, chunks, strict=True) if c]
    refs = [a.generate.remote(c, cfg.sampling) for a, c in busy]
    return pa.concat_tables(within(loop.actors, refs, [a for a, _ in busy], cfg,
                                   "call_timeout_s"))


def score(loop: Loop, rollouts: pa.Table) -> pa.Table:
    reward = loop.actors.reward
    ref = reward.score.remote(
        rollouts["prompt"].to_pylist(), rollouts["response"].to_pylist(),
        rollouts["principles"].to_pylist(), rollouts["response_token_ids"].to_pylist())
    (scores,) = within(loop.actors, [ref], [reward], loop.cfg, "call_timeout_s")
    return with_column(rollouts, "score", scores)


def reference(loop: Loop, rollouts: pa.Table) -> pa.Table:
    """The trainer's log-probs (policy and reference) and values for every response token."""
    trainer = loop.actors.trainer
    calls = {"policy_logprobs": trainer.policy_logprobs.remote(rollouts),
             "ref_logprobs": trainer.ref_logprobs.remote(rollouts)}
    if loop.cfg.advantage == "gae":
        calls["values"] = trainer.values.remote(rollouts)
    for name, ref in calls.items():
        # One deadline per pass: the trainer runs them one after another.
        (column,) = within(loop.actors, [ref], [trainer], loop.cfg, "call_timeout_s")
        rollouts = with_column(rollouts, name, column)
    return rollouts


def advantages(cfg: PPOConfig, rollouts: pa.Table) -> tuple[pa.Table, dict[str, float]]:
    """Shaped rewards, KL and advantages (`algos.ppo.compute_advantages`) into the rows."""
    import torch

    lengths = [len(r) for r in rollouts["response_token_ids"].to_pylist()]
    mask = length_mask(lengths)
    col = {k: pad_right(rollouts[k].to_pylist(), mask.shape[1])
           for k in ("logprobs", "policy_logprobs", "ref_logprobs", "values")
           if k != "values" or cfg.advantage == "gae"}
    scores = torch.tensor(rollouts["score"].to_pylist(), dtype=torch.float32)
    finished = torch.tensor(rollouts["finished"].to_pylist())
    adv = compute_advantages(cfg, scores, col["policy_logprobs"], col["ref_logprobs"], mask,
                             finished, col.get("values"))
    stats = step_stats(adv, scores, mask, finished)
    # How far the engine's sampling log-probs are from the trainer's: a weight-sync check.
    gap = ((col["logprobs"] - col["policy_logprobs"]).abs() * mask).max()
    stats["rollout_logprob_gap"] = float(gap)
    rollouts = with_column(rollouts, "reward", adv.rewards.tolist())
    rollouts = with_column(rollouts, "advantages", unpad(adv.advantages, lengths))
    if adv.returns is not None:
        rollouts = with_column(rollouts, "returns", unpad(adv.returns, lengths))
    return rollouts, stats


def sync_weights(actors: Actors, version: int, cfg: PPOConfig) -> float:
    """Hand the trainer's policy to every rollout engine; the slowest load's seconds.

    The trainer's `WeightsUpdate` (tensors, a folder it wrote once, or a LoRA adapter) is put
    in the object store once; each actor resolves the same ref. The trainer's part moves all
    its weights (the update's deadline); each engine's load has a call's.
    """
    trainer = actors.trainer
    update = trainer.weights_for_sync.remote(version)
    wait_all(actors, [update], [trainer], cfg, "update_timeout_s")
    loads = [a.update_weights.remote(update) for a in actors.rollouts]
    return max(within(actors, loads, actors.rollouts, cfg, "call_timeout_s"), default=0.0)


# --- actors --------------------------------------------------------------------------------


def start_actors(policy_path: str, reward: str | RewardFn, cfg: PPOConfig, engine: EngineConfig,
                 value_init_path: str | None, trainer_only: bool = False,
                 sync_dir: str | None = None) -> Actors:
    """Rollout engines, the reward actor and the trainer, each with an engine's share of CPUs.

    Raises before starting anything if the cluster lacks the CPUs they ask for: Ray would
    otherwise leave an actor pending forever, silently.
    """
    import ray

    from dromedary_ray.runtime.ppo.reward import RewardActor
    from dromedary_ray.runtime.ppo.rollout import RolloutActor
    from dromedary_ray.runtime.train_common import passed_env

    cpus, gpus = engine.cpus_per_engine, engine.gpus_per_engine
    n_engines = cfg.rollout_engines or engine.num_engines
    rm_cpus = cpus if isinstance(reward, str) else 0
    trainer_cpus = cfg.trainer_workers * cpus
    need = trainer_cpus + (0 if trainer_only else n_engines * cpus + rm_cpus)
    have = ray.cluster_resources().get("CPU", 0)
    if need > have:
        raise StageError(f"ppo needs {need:g} CPUs (rollout engines {n_engines} x {cpus:g}, "
                         f"reward model {rm_cpus:g}, trainer {cfg.trainer_workers} x {cpus:g}) "
                         f"but the Ray cluster has {have:g}: raise ray.num_cpus or lower "
                         "engine.cpus_per_engine")
    trainer = start_trainer(policy_path, cfg, engine, value_init_path, sync_dir)
    rollouts, reward_actor = [], None
    if not trainer_only:
        lora_rank = cfg.lora.rank if cfg.lora else None
        # The driver's fault spec (and caches) reach the actors only this way: a driver that
        # joins a running cluster does not pass its environment on to that cluster's workers.
        env = passed_env()
        extra: dict[str, Any] = {"runtime_env": {"env_vars": env}} if env else {}
        rollouts = [ray.remote(RolloutActor).options(num_cpus=cpus, num_gpus=gpus, **extra).remote(
            policy_path, engine, cfg.seed + i, max_lora_rank=lora_rank)
            for i in range(n_engines)]
        reward_actor = ray.remote(RewardActor).options(
            num_cpus=rm_cpus, num_gpus=gpus if isinstance(reward, str) else 0, **extra).remote(
            reward, cfg.principles_file, cfg.reward_backend, engine)
    actors = Actors(rollouts, reward_actor, trainer)
    try:
        await_start(actors, cfg)
    except Exception:
        stop_actors(actors)
        raise
    return actors


def await_start(actors: Actors, cfg: PPOConfig) -> None:
    """Wait for every actor to be up, at most `ppo.start_timeout_s`: a start-up error surfaces
    here, and so does a start that hangs or an actor Ray cannot place."""
    handles = [actors.trainer, *actors.rollouts]
    handles += [actors.reward] if actors.reward is not None else []
    try:
        within(actors, [h.health.remote() for h in handles], handles, cfg, "start_timeout_s")
    except CallTimedOut as err:
        raise StageError(
            f"stage ppo: the {err.role} actor did not start within ppo.start_timeout_s = "
            f"{err.seconds:g} s (a model load or engine start that hangs, or resources the "
            "cluster cannot give it); raise ppo.start_timeout_s if start-up is legitimately "
            "slower") from None


def start_trainer(policy_path: str, cfg: PPOConfig, engine: EngineConfig,
                  value_init_path: str | None, sync_dir: str | None) -> Any:
    """The trainer actor `ppo.trainer` names; both answer the same calls.

    torch: one process holding an engine's CPUs (and a GPU when the engines have them).
    deepspeed: a coordinator with no resources of its own; each of its ranks takes those.
    """
    import ray

    from dromedary_ray.runtime.train_common import passed_env

    if cfg.trainer == "deepspeed":
        from dromedary_ray.runtime.ppo.ds_trainer import PPOTrainerGroup as trainer_cls

        options: dict[str, Any] = {"num_cpus": 0}
    else:
        from dromedary_ray.runtime.ppo.trainer import PPOTrainer as trainer_cls

        options = {"num_cpus": engine.cpus_per_engine,
                   "num_gpus": 1 if engine.gpus_per_engine else 0}
    env = passed_env()  # the compiled-op and model caches, the fault spec of fault tests
    if env:
        options["runtime_env"] = {"env_vars": env}
    return ray.remote(trainer_cls).options(**options).remote(
        policy_path, cfg, value_init_path, engine=engine, sync_dir=sync_dir)


def stop_actors(actors: Actors) -> None:
    import ray

    for handle in [*actors.rollouts, actors.reward, actors.trainer]:
        if handle is not None:
            ray.kill(handle)  # also releases the engine's CPU-slot lock


# --- bookkeeping ---------------------------------------------------------------------------


def with_column(table: pa.Table, name: str, values: list[Any]) -> pa.Table:
    """`table` with column `name` replaced, typed by RolloutRow.SCHEMA."""
    i = table.schema.get_field_index(name)
    return table.set_column(i, RolloutRow.SCHEMA.field(name),
                            pa.array(values, type=RolloutRow.SCHEMA.field(name).type))


def run_fingerprint(prompts: Sequence[PromptRow], policy_path: str, reward: str | RewardFn,
                    value_init_path: str | None, cfg: PPOConfig, engine: EngineConfig) -> str:
    """What a checkpoint must match to be resumed: prompts, models and settings.

    `steps` is left out so that a run can be extended, `checkpoint_every_steps` because
    it changes when state is saved, not what is computed, and the deadlines because they
    bound how long a call may take (a rerun that raises one resumes).
    """
    settings = {k: v for k, v in dataclasses.asdict(cfg).items()
                if k not in ("steps", *PPO_NOT_FINGERPRINTED)}
    settings["principles_digest"] = file_digest(resolve_path(cfg.principles_file))
    source = reward if isinstance(reward, str) else f"function:{reward.__module__}." \
        f"{getattr(reward, '__qualname__', type(reward).__name__)}"
    key = {"prompts": [(p.id, p.query) for p in prompts], "policy": policy_path,
           "reward": source, "value_init": value_init_path, "ppo": settings,
           "engine": [engine.backend, engine.dtype, engine.max_model_len]}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


class PhaseTimer:
    """Wall seconds per named phase: `with timer("generate"): ...`."""

    def __init__(self) -> None:
        self._seconds: dict[str, float] = {}
        self._start = time.perf_counter()

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._seconds[name] = time.perf_counter() - t0

    def seconds(self) -> dict[str, float]:
        out = {f"seconds_{k}": v for k, v in self._seconds.items()}
        out["seconds_step"] = time.perf_counter() - self._start
        return out


class StepLog:
    """`ppo_steps.jsonl` (one JSON object per step) and TensorBoard scalars.

    A resumed run first drops the lines after its checkpoint's step, so each step appears
    once, with the numbers of the run that produced the saved weights.
    """

    def __init__(self, stage_dir: Path, resumed_step: int):
        from tensorboardX import SummaryWriter

        self.path = stage_dir / STEPS_FILE
        stage_dir.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resumed_step]
            tmp = self.path.with_suffix(f".tmp-{os.getpid()}")
            tmp.write_text("".join(f"{line}\n" for line in kept))
            tmp.replace(self.path)
        self.file = open(self.path, "a")  # noqa: SIM115 - lives as long as the loop
        self.writer = SummaryWriter(logdir=str(stage_dir / "tensorboard"))

    def write(self, row: dict[str, float]) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()  # a killed driver still leaves every finished step on disk
        for key, value in row.items():
            if key != "step":
                self.writer.add_scalar(f"ppo/{key}", value, row["step"])
        self.writer.flush()
        print(f"[ppo] step {row['step']} reward {row['reward_mean']:.3f} kl {row['kl']:.3f} "
              f"len {row['response_length']:.1f} {row['seconds_step']:.1f}s", flush=True)

    def close(self) -> None:
        self.file.close()
        self.writer.close()
