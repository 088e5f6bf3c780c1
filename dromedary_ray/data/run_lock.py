"""One run at a time per run directory: an flock(2) on `<run>/.lock`.

Two `dromedary run` processes on one run directory undo each other's work: one sweeps the
other's temporaries and half-written shards as leftovers of a crash, a changed fingerprint
clears a stage under the other's writers. The driver therefore holds this lock for the whole
run, and a second run stops at once with an error naming the holder (pid, host, since when,
its command line), which the lock file records.

The kernel drops an flock when the last descriptor of it closes, which a process's death does
however it dies (SIGKILL, OOM kill, a crash): a dead run never leaves a stale lock, so the file
is never deleted (deleting it would let two runs lock two different files of that name). The
descriptor is close-on-exec; only a child forked without exec would share it, which the error
says when the recorded holder has exited.

Within one process the lock is re-entrant, per run directory: I-SHEEP runs each iteration as a
run of its own in `<run>/isheep/iter_<k>/` from inside the outer run (which holds `<run>/.lock`,
the iteration takes its own), and a nested call for the same directory only counts up.

Object stores (`s3://`, `gs://`, ...) have no locks: no lock is taken there and a warning says
so; two runs on one object-store run directory are then not detected. A local filesystem
without flock support (some FUSE mounts) gets the same warning.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

from dromedary_ray.errors import RunLockedError

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"  # a dot-file: pyarrow's readers and the report skip it
_held: dict[str, tuple[int, int]] = {}  # this process's locks: lock file -> (fd, depth)
_guard = threading.Lock()


def local_run_path(run_dir: str) -> Path | None:
    """The run directory as a local path; None for an object store URI."""
    if "://" not in run_dir:
        return Path(run_dir).expanduser().resolve()
    if run_dir.startswith("file://"):
        return Path(urlparse(run_dir).path).resolve()
    return None


@contextmanager
def run_lock(run_dir: str) -> Iterator[Path | None]:
    """Hold `<run_dir>/.lock` for the block; RunLockedError if another process holds it.
    Yields the lock file, or None where no lock could be taken (see the module docstring)."""
    root = local_run_path(run_dir)
    if root is None:
        log.warning("run directory %s is on an object store, which has no file locks: a second "
                    "run on it at the same time would not be detected; run one at a time",
                    run_dir)
        yield None
        return
    lock = root / LOCK_NAME
    key = str(lock)
    with _guard:
        fd, depth = _held.get(key) or (_acquire(run_dir, lock), 0)
        _held[key] = (fd, depth + 1)
    try:
        yield lock if fd >= 0 else None
    finally:
        with _guard:
            fd, depth = _held.pop(key)
            if depth > 1:
                _held[key] = (fd, depth - 1)
            elif fd >= 0:
                os.close(fd)  # the last descriptor: the kernel drops the flock


def _acquire(run_dir: str, lock: Path) -> int:
    """An open, flocked descriptor of `lock` with this process recorded in it; -1 where the
    filesystem has no flock."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = describe_holder(_read_holder(fd))
        os.close(fd)
        raise RunLockedError(run_dir, str(lock), holder) from None
    except OSError as err:
        os.close(fd)
        if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
            raise
        log.warning("run directory %s: its filesystem has no file locks (%s): a second run on "
                    "it at the same time would not be detected", run_dir, err.strerror)
        return -1
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(_holder_record()).encode() + b"\n", 0)
    return fd


def _holder_record() -> dict[str, object]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
            "command": " ".join(sys.argv)[:300]}


def _read_holder(fd: int) -> dict[str, object]:
    try:
        record = json.loads(os.pread(fd, 4096, 0).decode())
    except (OSError, ValueError):  # the holder has locked, not yet written: nothing to show
        return {}
    return record if isinstance(record, dict) else {}


def describe_holder(record: dict[str, object]) -> str:
    """The holder as the error shows it: pid, host, since when, what it runs."""
    if not record.get("pid"):
        return "a process that is just starting (it has not recorded itself yet)"
    pid, host = record["pid"], record.get("host", "?")
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(record.get("since", 0))))
    text = f"pid {pid} on host {host} since {since}"
    if record.get("command"):
        text += f" ({record['command']})"
    if host == socket.gethostname() and not _alive(int(pid)):
        text += (f"; pid {pid} has exited, but a process it forked still holds the lock file "
                 f"open (`fuser -v` on the lock file names it)")
    return text


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True
