"""PPO checkpoints: one folder per saved step, written aside and renamed into place.

`<stage>/checkpoints/step-000040/` holds `trainer.pt` (policy, critic, both optimizers, RNG
states; written by the trainer actor) and `state.json` (the step and the run's fingerprint).
A folder named `step-*` is therefore always complete: a crash mid-save leaves only a
`.tmp-*` folder, which the next save clears. The trainer and the driver must see the same
folder (one node, or a shared file system), as for every training stage.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dromedary_ray.errors import DromedaryError

STATE = "state.json"
KEEP = 2  # finished checkpoints kept; older ones are deleted after each save


@dataclass(frozen=True)
class Checkpoint:
    step: int
    path: Path


def latest_checkpoint(root: Path, fingerprint: str) -> Checkpoint | None:
    """The newest complete checkpoint under `root`, refused if another run wrote it."""
    found = []
    for folder in root.glob("step-*"):
        if ".tmp-" in folder.name or not (folder / STATE).exists():
            continue
        state = json.loads((folder / STATE).read_text())
        if state.get("fingerprint") != fingerprint:
            raise DromedaryError(
                f"{folder} is a checkpoint of a PPO run with other prompts, models or "
                f"settings; delete {root} to start this run afresh")
        found.append(Checkpoint(int(state["step"]), folder))
    return max(found, key=lambda c: c.step, default=None)


def resume_step(checkpoint: Checkpoint | None, total_steps: int) -> int:
    """The step to continue after. A checkpoint past the configured total is an error.

    A checkpoint exactly at the total means the run finished its steps but stopped before
    writing the final model: the caller finishes from it, running no step (and says so).
    A checkpoint beyond it would be silently truncated to fewer steps than it has: refused.
    """
    if checkpoint is None:
        return 0
    if checkpoint.step > total_steps:
        raise DromedaryError(
            f"{checkpoint.path} is at step {checkpoint.step}, past ppo.steps={total_steps}: "
            f"set ppo.steps >= {checkpoint.step} to continue it, or delete "
            f"{checkpoint.path.parent} to train {total_steps} steps afresh")
    return checkpoint.step


def write_checkpoint(root: Path, step: int, fingerprint: str,
                     save_trainer: Callable[[str], None]) -> Path:
    """Save step `step`: the trainer writes its state into a temporary folder, then rename."""
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob("step-*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step-{step:06d}"
    tmp = root / f"{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    save_trainer(str(tmp))
    (tmp / STATE).write_text(json.dumps({"step": step, "fingerprint": fingerprint}))
    shutil.rmtree(final, ignore_errors=True)  # a rerun step after a resume saves it again
    os.replace(tmp, final)
    finished = sorted(p for p in root.glob("step-*") if ".tmp-" not in p.name)
    for old in finished[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final
