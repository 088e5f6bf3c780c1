"""Model shapes and GPU specs: the two data files of the planner, and model spec -> shape.

`models.yaml` holds the shapes of the models we plan for, `gpus.yaml` the memory, bandwidth and
peak FLOPs of the GPU types (sources in its comments). A model spec maps to a shape through a
`plan.model_shape` override, a built-in name, a local Hugging Face folder's config.json, or a
name or alias in `models.yaml`.
"""

from __future__ import annotations

import fnmatch
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dromedary_ray.errors import DromedaryError

DATA = Path(__file__).resolve().parent
GIB = 1 << 30


class PlanError(DromedaryError):
    """The planner cannot tell something it needs (a model's shape, a GPU type, a stage kind)."""


@dataclass(frozen=True)
class ModelShape:
    """A LLaMA-style decoder: the numbers memory and FLOPs depend on."""

    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    context: int
    params: int
    tied: bool = False
    qkv_bias: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def block_params(self) -> int:
        """Parameters of one decoder layer: q, k, v, o, gate, up, down, two norms."""
        attn = self.hidden * (self.hidden + 2 * self.kv_dim) + self.hidden * self.hidden
        bias = self.hidden + 2 * self.kv_dim if self.qkv_bias else 0
        return attn + bias + 3 * self.hidden * self.intermediate + 2 * self.hidden

    @property
    def largest_module_params(self) -> int:
        """The largest single module, as DeepSpeed's estimator counts "largest layer"."""
        return max(self.vocab * self.hidden, self.hidden * self.intermediate)

    def computed_params(self) -> int:
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return embeddings + self.layers * self.block_params + self.hidden

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class GpuSpec:
    name: str
    memory_gib: float
    bandwidth_gbs: float
    bf16_tflops: float

    @property
    def memory_bytes(self) -> float:
        return self.memory_gib * GIB

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@functools.cache
def _read(name: str) -> dict[str, Any]:
    return yaml.safe_load((DATA / name).read_text())


def model_shapes() -> dict[str, ModelShape]:
    return {name: _shape(name, entry) for name, entry in _read("models.yaml")["models"].items()}


def _shape(name: str, entry: dict[str, Any]) -> ModelShape:
    fields = {k: v for k, v in entry.items() if k != "aliases"}
    return ModelShape(name=name, **fields)


def gpu_specs() -> dict[str, GpuSpec]:
    return {name: GpuSpec(name, e["memory_gib"], e["bandwidth_gbs"], e["bf16_tflops"])
            for name, e in _read("gpus.yaml")["gpus"].items()}


def gpu_spec(name: str) -> GpuSpec:
    """A GPU type by its name or one of its aliases (case-insensitive)."""
    data = _read("gpus.yaml")["gpus"]
    specs = gpu_specs()
    for key, entry in data.items():
        if name.lower() in [key.lower()] + [a.lower() for a in entry.get("aliases", [])]:
            return specs[key]
    raise PlanError(f"unknown GPU type {name!r}; known: {', '.join(specs)}")


def gpu_for_instance(instance_type: str) -> str | None:
    """The GPU type a cloud machine type carries, or None when gpus.yaml does not list it."""
    for pattern, gpu in _read("gpus.yaml")["instance_types"].items():
        if fnmatch.fnmatchcase(instance_type, pattern):
            return gpu
    return None


def resolve_shape(model: str, override: str | None = None) -> ModelShape:
    """The shape of a config's `model` spec (or of `plan.model_shape` when set)."""
    spec = override or model
    path = Path(spec).expanduser()
    if (path / "config.json").is_file():
        return shape_from_hf_config(path / "config.json")
    shapes = model_shapes()
    aliases = _read("models.yaml")["models"]
    key = spec.lower().rstrip("/")
    base = key.rsplit("/", 1)[-1].removesuffix("-hf")
    for name, entry in aliases.items():
        names = {name, *(a.lower() for a in entry.get("aliases", []))}
        if key in names or base in names:
            return shapes[name]
    raise PlanError(
        f"cannot tell the shape of model {spec!r}: set plan.model_shape to one of "
        f"{', '.join(shapes)} or to a folder holding a Hugging Face config.json")


def shape_from_hf_config(path: Path) -> ModelShape:
    """A shape from a Hugging Face config.json (LLaMA, Qwen2, Mistral and alike)."""
    c = json.loads(path.read_text())
    try:
        heads = c["num_attention_heads"]
        shape = ModelShape(
            name=path.parent.name,
            layers=c["num_hidden_layers"],
            hidden=c["hidden_size"],
            intermediate=c["intermediate_size"],
            heads=heads,
            kv_heads=c.get("num_key_value_heads") or heads,
            vocab=c["vocab_size"],
            context=c.get("max_position_embeddings", 2048),
            params=0,
            tied=bool(c.get("tie_word_embeddings", False)),
            qkv_bias=c.get("model_type") == "qwen2" or bool(c.get("attention_bias", False)),
        )
    except KeyError as err:
        raise PlanError(f"{path}: no {err.args[0]!r}; set plan.model_shape to a known shape") \
            from None
    head_dim = c.get("head_dim")
    if head_dim and head_dim != shape.hidden // heads:
        raise PlanError(f"{path}: head_dim {head_dim} != hidden/heads; set plan.model_shape")
    return ModelShape(**{**shape.to_dict(), "params": shape.computed_params()})
