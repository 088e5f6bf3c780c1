"""A PPO run in its own driver process, for the tests that kill one and run it again
(`test_ppo.py -k killed_run`, `faults/test_fault_ppo.py`).

The driver joins the tests' local Ray cluster, runs `run_ppo` on the tiny model (4 prompts, 2 per
step, a checkpoint every 2 steps) with a programmatic reward and one rollout engine, or with a
reward model folder (vLLM's pooling runner) and two rollout engines; with the one-process
trainer or a 2-rank DeepSpeed group; with the default `ppo.call_timeout_s` or a short one (the
hung-actor cases). It prints one
`RESULT {...}` line; like `dromedary run`, it prints our own errors as one `error: ...` line and
exits 2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from dromedary_ray.runtime.faults import without_faults

RUN_SCRIPT = textwrap.dedent("""
    import json, sys
    from dromedary_ray.config import EngineConfig, PPOConfig, RayConfig, SamplingConfig
    from dromedary_ray.data.schemas import PromptRow
    from dromedary_ray.data.store import StageStore
    from dromedary_ray.errors import DromedaryError
    from dromedary_ray.runtime.cluster import connect
    from dromedary_ray.runtime.ppo.loop import run_ppo

    def low_id_share(prompts, responses, token_ids):
        return [sum(t < 6144 for t in ids) / max(len(ids), 1) for ids in token_ids]

    address, run_dir, model, steps, trainer, reward_model, call_timeout = sys.argv[1:8]
    connect(RayConfig(address=address))
    deadline = {"call_timeout_s": float(call_timeout)} if call_timeout else {}
    cfg = PPOConfig(steps=int(steps), prompts_per_step=2, mini_batch_size=2, ppo_epochs=1,
                    learning_rate=1e-3, value_init="policy", checkpoint_every_steps=2,
                    trainer=trainer, trainer_workers=2 if trainer == "deepspeed" else 1,
                    rollout_engines=2 if reward_model else 1,
                    sampling=SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=8),
                    **deadline)
    prompts = [PromptRow(f"p{i}", "seed", f"Question {i}?") for i in range(4)]
    try:
        # The reward model reads the principles too: it needs the longer context.
        result = run_ppo(prompts, policy_path=model, reward=reward_model or low_id_share,
                         cfg=cfg, engine=EngineConfig(max_model_len=1024 if reward_model else 256,
                                                      kv_cache_gib=1, cpus_per_engine=1),
                         store=StageStore(run_dir, "ppo"))
    except DromedaryError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print("RESULT " + json.dumps({"steps_run": result.steps_run,
                                  "resumed_from_step": result.resumed_from_step,
                                  "model_dir": result.model_dir}))
""")


def write_script(folder: Path) -> Path:
    script = folder / "run_ppo.py"
    script.write_text(RUN_SCRIPT)
    return script


def run_ppo_script(script: Path, address: str, run_dir: Path, model: str, steps: int,
                   fault: str | None = None, trainer: str = "torch",
                   reward_model: str | None = None, hang: str | None = None,
                   call_timeout_s: float | None = None) -> subprocess.CompletedProcess:
    """The driver to its end; `fault` and `hang` become its DROMEDARY_FAULT and DROMEDARY_HANG
    (no fault or hang spec is inherited); `trainer`: torch (one process) or deepspeed (2 ZeRO-3
    ranks); `reward_model`: a folder to score with (and two rollout engines), None for the
    programmatic reward (and one); `call_timeout_s`: ppo.call_timeout_s, None for the default."""
    env = without_faults(dict(os.environ))
    if fault:
        env["DROMEDARY_FAULT"] = fault
    if hang:
        env["DROMEDARY_HANG"] = hang
    return subprocess.run([sys.executable, str(script), address, str(run_dir), model, str(steps),
                           trainer, reward_model or "",
                           "" if call_timeout_s is None else str(call_timeout_s)],
                          env=env, capture_output=True, text=True, timeout=400)


def script_result(proc: subprocess.CompletedProcess) -> dict:
    """The RESULT line of a driver that must have succeeded."""
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    return json.loads(line.removeprefix("RESULT "))
