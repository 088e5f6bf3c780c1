import json
from pathlib import Path

import pytest

from dromedary_ray.errors import ModelSpecError
from dromedary_ray.models import resolve_model


def test_unknown_builtin_and_bad_paths(tmp_path: Path):
    with pytest.raises(ModelSpecError, match="unknown built-in model 'builtin:gpt5'"):
        resolve_model("builtin:gpt5")
    with pytest.raises(ModelSpecError, match="holds no config.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(ModelSpecError, match="no finished model"):
        resolve_model("run:engrave", str(tmp_path))
    with pytest.raises(ModelSpecError, match="needs a run directory"):
        resolve_model("run:engrave")
    with pytest.raises(ModelSpecError, match="neither builtin"):
        resolve_model("./does/not/exist")


def test_local_folder_and_hub_id_pass_through(tmp_path: Path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    hub_id = "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert resolve_model(hub_id) == hub_id


def test_run_spec_finds_a_stage_model(tmp_path: Path):
    model = tmp_path / "engrave" / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    assert resolve_model("run:engrave", str(tmp_path)) == str(model)


@pytest.mark.slow
def test_builtins_are_built_once_and_fit_vllm_cpu(tiny_model):
    smol = Path(resolve_model("builtin:smollm2-135m"))
    cfg = json.loads((smol / "config.json").read_text())
    # Converted from GGUF to plain safetensors: no quantization left for vLLM to trip on.
    assert "quantization_config" not in cfg and (smol / "model.safetensors").exists()
    assert cfg["num_hidden_layers"] == 30 and cfg["hidden_size"] == 576
    tiny = json.loads((Path(tiny_model) / "config.json").read_text())
    assert tiny["hidden_size"] // tiny["num_attention_heads"] == 64  # vLLM-CPU's minimum
    assert tiny["vocab_size"] == cfg["vocab_size"]
    mtime = (Path(tiny_model) / "model.safetensors").stat().st_mtime
    assert resolve_model("builtin:tiny-llama") == tiny_model  # cached: not rebuilt
    assert (Path(tiny_model) / "model.safetensors").stat().st_mtime == mtime


@pytest.mark.slow
def test_tiny_llama_is_seeded(tmp_path: Path, tiny_model):
    from safetensors.torch import load_file

    from dromedary_ray.models import _build_tiny_llama

    _build_tiny_llama(tmp_path / "again")
    a = load_file(str(Path(tiny_model) / "model.safetensors"))
    b = load_file(str(tmp_path / "again" / "model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
