"""The GPU pools of a cluster file: Ray autoscaler YAML (`available_node_types`) or KubeRay.

A pool is a node type with GPUs: how many per node, which GPU (from the machine type, through
gpus.yaml's `instance_types`, or a KubeRay group's `nvidia.com/gpu.product` node selector), its
CPUs, its `max_workers`, and the role its custom resource marks: `pool_generation` (vLLM
engines) or `pool_training` (Ray Train workers). Pools without a marker serve either role.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dromedary_ray.plan.specs import PlanError, gpu_for_instance, gpu_spec

ROLES = {"pool_generation": "generate", "pool_training": "train"}


@dataclass(frozen=True)
class Pool:
    name: str
    gpu: str | None  # GPU type name in gpus.yaml; None when the machine type is not listed
    gpus_per_node: int
    cpus_per_node: float
    max_nodes: int
    role: str | None  # "generate", "train" or None (any)
    machine: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def load_pools(path: str | Path, gpu_override: str | None = None) -> list[Pool]:
    """The GPU pools of a cluster file, with `gpu_override` (a GPU type) replacing their GPUs."""
    p = Path(path)
    try:
        doc = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise PlanError(f"cluster file not found: {path}") from None
    if not isinstance(doc, dict):
        raise PlanError(f"{path}: not a cluster file (top level must be a mapping)")
    if "available_node_types" in doc:
        pools = [_autoscaler_pool(name, t) for name, t in doc["available_node_types"].items()]
    elif doc.get("kind") in ("RayCluster", "RayJob", "RayService"):
        pools = [_kuberay_pool(g) for g in _kuberay_groups(doc)]
    else:
        raise PlanError(f"{path}: neither a Ray autoscaler config (available_node_types) nor "
                        "a KubeRay RayCluster/RayJob/RayService")
    pools = [pool for pool in pools if pool.gpus_per_node > 0]
    if not pools:
        raise PlanError(f"{path}: no node type with GPUs")
    if gpu_override:
        gpu = gpu_spec(gpu_override).name
        pools = [Pool(**{**pool.to_dict(), "gpu": gpu}) for pool in pools]
    for pool in pools:
        if pool.gpu is None:
            raise PlanError(f"{path}: pool {pool.name}: machine type {pool.machine!r} is not in "
                            "dromedary_ray/plan/gpus.yaml (instance_types); pass --gpu TYPE")
    return pools


def _autoscaler_pool(name: str, node_type: dict[str, Any]) -> Pool:
    resources = node_type.get("resources", {})
    config = node_type.get("node_config", {})
    machine = config.get("InstanceType") or config.get("machineType") or ""
    return Pool(name=name, gpu=gpu_for_instance(machine) if machine else None,
                gpus_per_node=int(resources.get("GPU", 0)),
                cpus_per_node=float(resources.get("CPU", 0)),
                max_nodes=int(node_type.get("max_workers", 0)),
                role=_role(resources), machine=machine)


def _kuberay_groups(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc.get("spec", {})
    spec = spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec
    return spec.get("workerGroupSpecs", [])


def _kuberay_pool(group: dict[str, Any]) -> Pool:
    pod = group.get("template", {}).get("spec", {})
    limits = pod.get("containers", [{}])[0].get("resources", {}).get("limits", {})
    product = pod.get("nodeSelector", {}).get("nvidia.com/gpu.product")
    raw = group.get("rayStartParams", {}).get("resources", "{}")
    # KubeRay's spelling: a JSON object inside escaped quotes, '"{\"pool_training\": 8}"'.
    resources = json.loads(raw.strip().strip('"').replace('\\"', '"') or "{}")
    gpu = None
    if product:
        try:
            gpu = gpu_spec(product).name
        except PlanError:
            gpu = None
    return Pool(name=group.get("groupName", "?"), gpu=gpu,
                gpus_per_node=int(limits.get("nvidia.com/gpu", 0)),
                cpus_per_node=_cpus(limits.get("cpu", 0)),
                max_nodes=int(group.get("maxReplicas", 0)), role=_role(resources),
                machine=product or "")


def _cpus(quantity: Any) -> float:
    """A Kubernetes CPU quantity: 8, "8" or "500m"."""
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _role(resources: dict[str, Any]) -> str | None:
    roles = [role for marker, role in ROLES.items() if resources.get(marker)]
    return roles[0] if len(roles) == 1 else None


def pool_for(pools: list[Pool], role: str) -> list[Pool]:
    """The pools a phase may use: those marked for its role, else the unmarked ones."""
    marked = [p for p in pools if p.role == role]
    return marked or [p for p in pools if p.role is None]
