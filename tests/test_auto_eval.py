"""Automatic evaluation after a stage: the model is scored by a real suite in a Ray task, the
result lands where the run report reads it, and an unchanged model is not scored again."""

import json
import shutil
from pathlib import Path

import pytest

from dromedary_ray.config import PROJECT_ROOT, load_config
from dromedary_ray.errors import ConfigError

pytestmark = pytest.mark.slow


def test_stage_model_is_evaluated_once_and_reported(tmp_path: Path, tiny_model, ray_local):
    from dromedary_ray.pipeline.evaluate import evaluate_model, result_path, stage_model
    from dromedary_ray.report import write_report

    run = tmp_path / "run"
    assert stage_model(load_config(None, [f"run_dir={run}"]), "engrave") is None
    shutil.copytree(tiny_model, run / "engrave" / "model")
    config = load_config(PROJECT_ROOT / "configs/local.yaml", [
        f"run_dir={run}", "recipe=dromedary", "evaluate.suites=[ifeval]", "evaluate.limit=3",
        "evaluate.max_new_tokens=8", "evaluate.backend=transformers", "engine.cpus_per_engine=1"])
    spec = stage_model(config, "engrave")
    assert spec == "run:engrave"
    written = evaluate_model(config, spec, "engrave", made_by="fingerprint-1")
    path = result_path(config, "engrave", "ifeval")
    assert written and path.exists()
    result = json.loads(path.read_text())
    assert result["label"] == "engrave" and result["made_by"] == "fingerprint-1"
    assert len(result["items"]) == 3 and "instruction_level" in result["metrics"]
    stamp = path.stat().st_mtime_ns
    assert evaluate_model(config, spec, "engrave", made_by="fingerprint-1") == []
    assert path.stat().st_mtime_ns == stamp  # the same model is not scored twice
    assert evaluate_model(config, spec, "engrave", made_by="fingerprint-2")  # a new model is
    html = Path(write_report(str(run), None).html).read_text()
    assert "ifeval" in html and "engrave" in html


def test_evaluate_config_names_what_is_missing():
    with pytest.raises(ConfigError, match="evaluate.hhh_data"):
        load_config(None, ["evaluate.suites=[hhh]"])
    with pytest.raises(ConfigError, match="evaluate.suites"):
        load_config(None, ["evaluate.suites=[pairwise]"])
