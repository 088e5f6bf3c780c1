"""Fault injection for the reliability tests: a real process death, or a hang, at a named point.

`DROMEDARY_FAULT="<point>:<n>:<marker>"` kills this process with SIGKILL the n-th time it
reaches `point`, once per marker file (the file is created first, so a restarted worker or a
resumed driver runs on). `DROMEDARY_HANG="<point>:<seconds>[:<n>]"` makes every call reaching
`point` (from its n-th time on, the first if n is left out) block for that long: a hung engine,
or a training run held still at a known step while a test kills its driver. Unset, each hook
costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from pathlib import Path

ENV = "DROMEDARY_FAULT"
HANG_ENV = "DROMEDARY_HANG"
_hits: Counter[str] = Counter()
_hangs: Counter[str] = Counter()


def maybe_die(point: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    target, n, marker = spec.split(":", 2)
    if target != point:
        return
    _hits[point] += 1
    if _hits[point] < int(n) or Path(marker).exists():
        return
    Path(marker).write_text(f"{point} {os.getpid()}\n")
    os.kill(os.getpid(), signal.SIGKILL)


def maybe_hang(point: str) -> None:
    spec = os.environ.get(HANG_ENV)
    if not spec:
        return
    target, seconds, *n = spec.split(":")
    if target != point:
        return
    _hangs[point] += 1
    if _hangs[point] >= int(n[0] if n else 1):
        time.sleep(float(seconds))


def fault_env() -> dict[str, str]:
    """The fault specs to pass on to Ray workers (empty when none is set)."""
    return {k: os.environ[k] for k in (ENV, HANG_ENV) if os.environ.get(k)}


def without_faults(env: dict[str, str]) -> dict[str, str]:
    """`env` less the fault specs: for a child process that must run unfaulted unless told."""
    return {k: v for k, v in env.items() if k not in (ENV, HANG_ENV)}
