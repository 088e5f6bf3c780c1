"""Fault injection for the reliability tests: a real process death at a named point.

`DROMEDARY_FAULT="<point>:<n>:<marker>"` kills this process with SIGKILL the n-th time it
reaches `point`, once per marker file (the file is created first, so a restarted worker or a
resumed driver runs on). Unset, `maybe_die` costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from pathlib import Path

ENV = "DROMEDARY_FAULT"
_hits: Counter[str] = Counter()


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


def fault_env() -> dict[str, str]:
    """The fault spec to pass on to Ray workers (empty when none is set)."""
    return {ENV: os.environ[ENV]} if os.environ.get(ENV) else {}
