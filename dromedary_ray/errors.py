"""The project's own error types: each names what the user must fix."""

from __future__ import annotations

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


def read_input_text(path: str | Path) -> str:
    """A user file's text, or an InputFileError saying it is missing or not UTF-8."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputFileError(str(path), "file not found") from None
    except UnicodeDecodeError as err:
        raise InputFileError(str(path), f"not UTF-8 text ({err.reason})") from None
