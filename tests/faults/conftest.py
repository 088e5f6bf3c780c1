"""The fault-injection suite's reference runs: one uninterrupted run per stage kind, made once per
session and shared by every case that compares its tables with it."""

from __future__ import annotations

from pathlib import Path

import pytest
from fault_helpers import dromedary_run, engrave_run


@pytest.fixture(scope="session")
def generation_reference(tmp_path_factory, tiny_model) -> Path:
    """An uninterrupted `dromedary run` of seeds -> self_align."""
    run_dir = tmp_path_factory.mktemp("gen_reference") / "run"
    out = dromedary_run(run_dir)
    assert out.returncode == 0, out.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="session")
def training_reference(tmp_path_factory, tiny_model) -> tuple[Path, dict]:
    """An uninterrupted engrave run: its run directory and stage report."""
    run_dir = tmp_path_factory.mktemp("train_reference") / "run"
    return run_dir, engrave_run(run_dir)
