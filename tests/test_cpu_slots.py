"""The per-user CPU slot locks of vLLM-CPU engines (`engines/vllm_engine.py::claim_cpu_cores`):
they live in the user's own cache folder, so a shared /tmp folder that another user made first,
or filled with locks of their own, costs our engines nothing. No engine starts; milliseconds."""

from __future__ import annotations

import fcntl
import os
import stat
import tempfile
from pathlib import Path

import pytest

from dromedary_ray.engines import vllm_engine

OLD_FOLDER = "dromedary-cpu-slots"  # where the locks used to be: <tmp>/dromedary-cpu-slots


@pytest.fixture
def slots(monkeypatch, tmp_path):
    """A fresh DROMEDARY_HOME and a stand-in for the shared /tmp; the claims' lock files are
    closed (their locks released) at the end, as the engine's process exit would."""
    home, shared = tmp_path / "home", tmp_path / "shared-tmp"
    shared.mkdir()
    monkeypatch.setenv("DROMEDARY_HOME", str(home))
    monkeypatch.setattr(tempfile, "tempdir", str(shared))
    held: list = []
    monkeypatch.setattr(vllm_engine, "_held_slot_files", held)
    yield home, shared
    for handle in held:
        handle.close()


def squat_with_a_file(shared: Path) -> list:
    (shared / OLD_FOLDER).write_text("not a folder\n")  # the name taken, by a file
    return []


def squat_every_slot(shared: Path) -> list:
    """Another user's folder whose every slot file is locked (here by this test's handles)."""
    folder = shared / OLD_FOLDER
    folder.mkdir()
    handles = []
    for slot in range(os.cpu_count() or 1):
        handle = open(folder / f"1-{slot}.lock", "w")  # noqa: SIM115 - held until the end
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        handles.append(handle)
    return handles


@pytest.mark.parametrize("squat", [squat_with_a_file, squat_every_slot],
                         ids=["name-taken-by-a-file", "every-slot-locked"])
def test_a_squatted_shared_tmp_folder_costs_our_engines_nothing(slots, squat):
    home, shared = slots
    foreign = squat(shared)
    squatted = set(shared.rglob("*"))
    try:
        assert vllm_engine.claim_cpu_cores(1) == "0"  # the first slot, not "nobind", no error
        folder = home / "cpu-slots"
        assert (folder / "1-0.lock").exists()
        assert stat.S_IMODE(folder.stat().st_mode) & 0o077 == 0  # other users get nothing
        if (os.cpu_count() or 1) >= 2:  # a second engine takes the next slot, not the same one
            assert vllm_engine.claim_cpu_cores(1) == "1"
    finally:
        for handle in foreign:
            handle.close()
    assert set(shared.rglob("*")) == squatted  # nothing of ours went to the shared folder
