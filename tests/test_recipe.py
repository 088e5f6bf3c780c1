"""The whole `dromedary` recipe end to end on the tiny model, through the CLI: synthesize,
self_align, engrave, verbose_clone; then a rerun that skips every stage (settings: tiny_run.py).
"""

import json
from pathlib import Path

import pytest
from tiny_run import dromedary, tiny_dromedary

from dromedary_ray.config import PROJECT_ROOT

pytestmark = pytest.mark.slow

TINY = tiny_dromedary()


def manifest(run: Path, stage: str) -> dict:
    return json.loads((run / stage / "manifest.json").read_text())


def test_dromedary_recipe_end_to_end_then_skips(tiny_dromedary_run):
    run, first = tiny_dromedary_run
    assert first.returncode == 0, first.stderr[-4000:]
    stages = ["synthesize", "self_align", "engrave", "verbose_clone"]
    for stage in stages:
        assert manifest(run, stage)["status"] == "done", stage
        assert f"{stage:<12} ran" in first.stdout
    # self_align answered the synthetic prompts, not the seeds.
    synth = manifest(run, "synthesize")["rows"]["data"]
    align = manifest(run, "self_align")["rows"]
    assert synth > 0 and align["data"] + align["rejects"] == synth
    assert align["data"] > 0
    for stage in ("engrave", "verbose_clone"):
        model = run / stage / "model"
        assert (model / "config.json").exists() and list(model.glob("*.safetensors")), stage
    train = manifest(run, "verbose_clone")["metrics"]["train"]
    assert train["steps"] == 4
    # The verbose stage generated with the engraved model, then trained from the base.
    assert manifest(run, "verbose_clone")["input_fingerprints"]["engrave"] == \
        manifest(run, "engrave")["fingerprint"]
    again = dromedary("run", str(PROJECT_ROOT / "configs/local.yaml"), "--run-dir", str(run),
                      *TINY)
    assert again.returncode == 0, again.stderr[-2000:]
    for stage in stages:
        assert f"{stage:<12} skipped" in again.stdout
    # The run report renders from this real run and names every stage with its status.
    from test_report import parse

    report = dromedary("report", str(run))
    assert report.returncode == 0, report.stderr[-2000:]
    page = parse(run / "report" / "report.html")
    for stage in stages:
        assert stage in page.headings and page.status[stage] == "done", stage
    assert page.images and all(src.startswith("data:image/png;base64,") for src in page.images)
