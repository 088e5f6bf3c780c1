"""The `dromedary` command end to end on the tiny model, and its answers to bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from dromedary_ray.config import PROJECT_ROOT

CONFIG = str(PROJECT_ROOT / "configs/local.yaml")
TINY = ["model=builtin:tiny-llama", "seeds.max_prompts=8", "engine.batch_size=4",
        "engine.kv_cache_gib=1", "self_align.sampling.max_new_tokens=24"]


def dromedary(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dromedary_ray.cli", *args], env=dict(os.environ),
                          capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_run_end_to_end_then_skip(tmp_path: Path):
    run = tmp_path / "run"
    first = dromedary("run", CONFIG, "--run-dir", str(run), *TINY)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "self_align   ran" in first.stdout and str(run / "self_align") in first.stdout
    manifest = json.loads((run / "self_align" / "manifest.json").read_text())
    assert manifest["status"] == "done"
    assert manifest["rows"]["data"] + manifest["rows"]["rejects"] == 8
    assert manifest["metrics"]["completion_tokens"] > 0
    assert (run / "config.yaml").read_text().count("tiny-llama") == 1
    rejects = pq.read_table(run / "self_align" / "rejects")
    assert sorted(rejects.column_names) == ["detail", "id", "reason", "stage"]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(x["name"], x["status"]) for x in lines] == [("seeds", "ran"), ("self_align", "ran")]
    assert list((run / "tensorboard" / "self_align").glob("events.out.tfevents.*"))
    second = dromedary("run", CONFIG, "--run-dir", str(run), *TINY)
    assert second.returncode == 0
    assert "self_align   skipped" in second.stdout


def test_broken_seed_row_fails_before_anything_runs(tmp_path: Path):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text('{"instruction": "fine"}\n{"instruction": 42}\n')
    out = dromedary("run", CONFIG, "--run-dir", str(tmp_path / "run"), f"seeds.file={seeds}")
    assert out.returncode == 2
    assert f"error: {seeds}:2 [instruction]: missing or empty string" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "run" / "seeds").exists()


def test_broken_principles_keep_finished_stages(tmp_path: Path):
    run = tmp_path / "run"
    seeds_only = dromedary("run", CONFIG, "--run-dir", str(run), "recipe=seeds_only")
    assert seeds_only.returncode == 0, seeds_only.stderr[-2000:]
    before = (run / "seeds" / "manifest.json").read_text()
    bad = tmp_path / "principles.yaml"
    bad.write_text("name: x\nrules:\n  - {id: 1, name: a}\n")
    out = dromedary("run", CONFIG, "--run-dir", str(run), f"self_align.principles_file={bad}")
    assert out.returncode == 2
    assert f"error: {bad} [exemplars]: missing required key" in out.stderr
    assert (run / "seeds" / "manifest.json").read_text() == before


def test_bad_override_names_the_key(tmp_path: Path):
    out = dromedary("run", CONFIG, "--run-dir", str(tmp_path), "engine.num_engins=2")
    assert out.returncode == 2 and "engine.num_engins: unknown key" in out.stderr
