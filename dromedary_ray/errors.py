"""The project's own error types: each names what the user must fix."""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path


class DromedaryError(Exception):
    """Base class: an error with a message meant for the user, shown without a traceback."""


class ConfigError(DromedaryError):
    """A configuration key or value is wrong; the message names the dotted key."""


class InputFileError(DromedaryError):
    """A user-supplied file (principles, seeds, dataset) is malformed.

    The message always starts with ``path[:line]`` and names the key or field at fault.
    """

    def __init__(self, path: str, what: str, line: int | None = None, key: str | None = None):
        where = f"{path}:{line}" if line is not None else str(path)
        field = f" [{key}]" if key else ""
        super().__init__(f"{where}{field}: {what}")
        self.path, self.line, self.key = str(path), line, key


class ModelSpecError(DromedaryError):
    """A model spec cannot be resolved to a local Hugging Face folder."""


class StageError(DromedaryError):
    """A stage cannot run (missing input, inconsistent store)."""


class ActorLostError(StageError):
    """An actor of a stage's loop died mid-step (a killed process, a lost node), or between
    steps (`phase`: while loading a checkpoint, while writing the final model).

    The message names the actor, when it died and where a rerun resumes; `actor`, `step` and
    `resume_step` carry the same for callers.
    """

    def __init__(self, stage: str, actor: str, step: int, resume_step: int,
                 phase: str | None = None):
        where = (f"the checkpoint at step {resume_step}" if resume_step
                 else "step 0 (no checkpoint was written yet)")
        lost = (f"during step {step}; nothing of step {step} was kept" if phase is None
                else f"{phase}; no finished step was lost")
        super().__init__(f"stage {stage}: the {actor} actor died {lost}. Run the stage again to "
                         f"resume from {where}")
        self.actor, self.step, self.resume_step = actor, step, resume_step


class RunLockedError(DromedaryError):
    """Another process holds the run directory's lock (`dromedary_ray/data/run_lock.py`)."""

    def __init__(self, run_dir: str, lock_path: str, holder: str):
        super().__init__(
            f"run directory {run_dir} is in use by another run: {holder} (lock file "
            f"{lock_path}). Wait for that run to end or stop it, then run again; a run that "
            f"crashed or was killed lets go of the lock by itself")
        self.run_dir, self.lock_path, self.holder = run_dir, lock_path, holder


DISK_FULL = {errno.ENOSPC: "no space left on the device",
             errno.EDQUOT: "the disk quota is exceeded"}


class StoreFullError(DromedaryError):
    """A write into the run directory failed for want of space (ENOSPC) or quota (EDQUOT).

    Raised inside Ray workers too (shard writes), so it pickles by its own arguments: the
    driver gets it back whole inside Ray's task error and prints this message alone.
    """

    def __init__(self, path: str, err_no: int, stage: str | None = None,
                 host: str | None = None):
        where = f"stage {stage}: " if stage else ""
        on = f" on host {host}" if host else ""
        free = ("Raise the quota or free space within it" if err_no == errno.EDQUOT
                else "Free space on that disk")
        super().__init__(
            f"{where}{DISK_FULL.get(err_no, os.strerror(err_no))} writing {path}{on}. "
            f"{free} (or set run_dir to a disk with room) and run the same "
            f"command again: committed shards are kept and the run resumes from them")
        self.path, self.err_no, self.stage, self.host = path, err_no, stage, host

    def __reduce__(self):
        return (StoreFullError, (self.path, self.err_no, self.stage, self.host))


def user_error(err: BaseException) -> DromedaryError | None:
    """Our own error in `err`, unwrapped from Ray's task errors; None when there is none.

    `ray.get` re-raises a worker's exception as a class deriving from both Ray's error and
    ours, whose message is Ray's whole traceback; the worker's own exception is its `cause`.
    Only Ray's wrappers are looked through: any other exception is a bug to show in full,
    even one raised while handling one of ours.
    """
    ray_exceptions = sys.modules.get("ray.exceptions")  # loaded if Ray could have wrapped it
    ray_error = getattr(ray_exceptions, "RayError", ())
    seen: set[int] = set()
    todo: list[BaseException | None] = [err]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if not isinstance(e, ray_error):
            if isinstance(e, DromedaryError):
                return e
            continue
        todo += [getattr(e, "cause", None), e.__cause__]
    return None


def read_input_text(path: str | Path) -> str:
    """A user file's text, or an InputFileError saying it is missing or not UTF-8."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputFileError(str(path), "file not found") from None
    except UnicodeDecodeError as err:
        raise InputFileError(str(path), f"not UTF-8 text ({err.reason})") from None
