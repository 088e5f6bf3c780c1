"""The cluster configs in cluster/, checked without a cluster, a cloud account or Kubernetes.

Each check is a function that returns a list of problems; the tests assert that the shipped files
have none, and `test_checks_catch_broken_configs` feeds every check a broken variant to show that
it can fail. Validation uses Ray's own code where Ray has it: the autoscaler's JSON schema and
`validate_config`, the KubeRay autoscaler's translation of a RayCluster spec, Ray Serve's config
schema, and the runtime-env parser behind `ray job submit --runtime-env`.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
AUTOSCALER_FILES = ("aws.yaml", "gcp.yaml")
KUBERAY_FILES = ("raycluster.yaml", "rayjob.yaml", "rayservice.yaml")
RAY_PORTS = (6379, 8265, 10001)  # GCS, dashboard/job API, Ray client: never open to the world
# The pool markers the README documents, one unit per GPU of a node.
POOL_MARKERS = {"pool_generation", "pool_training"}
STANDARD_RESOURCES = {"CPU", "GPU", "memory", "object_store_memory"}
IMAGE_PROJECT_DIR = "/home/ray/dromedary-ray"  # where the KubeRay image holds the repository


# --- loading ---------------------------------------------------------------------------------


def load_autoscaler(name: str) -> dict[str, Any]:
    return yaml.safe_load((CLUSTER / name).read_text())


def load_manifest(name: str, kind: str) -> dict[str, Any]:
    """The one document of `kind` in a (possibly multi-document) manifest file."""
    docs = [d for d in yaml.safe_load_all((KUBERAY / name).read_text()) if d]
    matching = [d for d in docs if d.get("kind") == kind]
    assert len(matching) == 1, f"{name}: expected one {kind}, found {len(matching)}"
    return matching[0]


def cluster_spec(manifest: dict[str, Any]) -> dict[str, Any]:
    """The RayCluster spec inside any of the three kinds."""
    spec = manifest.get("spec") or {}
    return {
        "RayCluster": lambda: spec,
        "RayJob": lambda: spec.get("rayClusterSpec") or {},
        "RayService": lambda: spec.get("rayClusterConfig") or {},
    }[manifest.get("kind")]()


def key_refs(spec: dict[str, Any], env_name: str) -> list[dict[str, Any]]:
    """The secretKeyRef of every container env entry named `env_name`, in every pod group."""
    groups = [spec.get("headGroupSpec") or {}, *(spec.get("workerGroupSpecs") or [])]
    return [((e.get("valueFrom") or {}).get("secretKeyRef") or {})
            for g in groups for c in (g.get("template") or {}).get("spec", {}).get("containers", [])
            for e in c.get("env") or [] if e.get("name") == env_name]


def without_key_optionality(spec: dict[str, Any]) -> dict[str, Any]:
    """A cluster spec minus `optional` on Secret refs: the RayService requires the API key's
    Secret (it serves with it), the training clusters take it if it exists."""
    spec = copy.deepcopy(spec)
    for groups in ([spec.get("headGroupSpec") or {}], spec.get("workerGroupSpecs") or []):
        for g in groups:
            for c in (g.get("template") or {}).get("spec", {}).get("containers", []):
                for e in c.get("env") or []:
                    ((e.get("valueFrom") or {}).get("secretKeyRef") or {}).pop("optional", None)
    return spec


def manifests() -> dict[str, dict[str, Any]]:
    return {
        "raycluster.yaml": load_manifest("raycluster.yaml", "RayCluster"),
        "rayjob.yaml": load_manifest("rayjob.yaml", "RayJob"),
        "rayservice.yaml": load_manifest("rayservice.yaml", "RayService"),
    }


def ray_schema() -> dict[str, Any]:
    import ray.autoscaler

    path = Path(os.path.dirname(ray.autoscaler.__file__)) / "ray-schema.json"
    return json.loads(path.read_text())


def kuberay_autoscaling_config(manifest: dict[str, Any]) -> dict[str, Any]:
    """What the KubeRay autoscaler sidecar makes of a cluster spec (it runs validate_config)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import (
        _derive_autoscaling_config_from_ray_cr,
    )

    cr = {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": manifest["metadata"]["name"], "namespace": "default"},
        "spec": copy.deepcopy(cluster_spec(manifest)),
    }
    return _derive_autoscaling_config_from_ray_cr(cr)


def serve_config(manifest: dict[str, Any]) -> dict[str, Any]:
    return yaml.safe_load(manifest["spec"]["serveConfigV2"])


# --- checks: Ray autoscaler files --------------------------------------------------------------


def check_ray_schema(config: dict[str, Any]) -> list[str]:
    import jsonschema

    try:
        jsonschema.validate(config, ray_schema())
    except jsonschema.ValidationError as err:
        return [f"ray-schema.json: {'/'.join(map(str, err.absolute_path))}: {err.message}"]
    return []


def check_ray_validator(config: dict[str, Any]) -> list[str]:
    """What `ray up` does before it touches the cloud: merge the provider's defaults, validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        validate_config(prepare_config(copy.deepcopy(config)))
    except Exception as err:  # jsonschema.ValidationError, ValueError, ...
        return [f"validate_config: {type(err).__name__}: {str(err).splitlines()[0]}"]
    return []


def gpu_count(node_type: dict[str, Any]) -> int:
    return int(node_type.get("resources", {}).get("GPU", 0))


def check_node_types(config: dict[str, Any]) -> list[str]:
    problems = []
    types = config.get("available_node_types", {})
    head = config.get("head_node_type")
    if head not in types:
        return [f"head_node_type {head!r} is not one of available_node_types {sorted(types)}"]
    if types[head].get("resources", {}).get("CPU") != 0:
        problems.append("head must advertise CPU: 0 so that no task or actor runs there")
    if gpu_count(types[head]):
        problems.append("head must be a CPU machine")
    gpu_pools = {n: t for n, t in types.items() if gpu_count(t) > 0}
    if len(gpu_pools) < 2:
        problems.append(f"expected a generation and a training GPU pool, found {sorted(gpu_pools)}")
    for name, t in gpu_pools.items():
        if t.get("min_workers", 0) != 0:
            problems.append(f"{name}: GPU pools must scale from zero (min_workers: 0)")
        if t.get("max_workers", 0) < 1:
            problems.append(f"{name}: max_workers must allow at least one node")
    workers_max = sum(t.get("max_workers", 0) for n, t in types.items() if n != head)
    if config.get("max_workers") != workers_max:
        problems.append(f"max_workers {config.get('max_workers')} != sum of pool maxima "
                        f"{workers_max} (a smaller global cap silently starves a pool)")
    for key in ("idle_timeout_minutes", "upscaling_speed"):
        if not config.get(key, 0) > 0:
            problems.append(f"{key} must be set and positive")
    return problems


def pool_shapes(types: dict[str, dict[str, Any]]) -> list[tuple[int, tuple]]:
    """(GPUs per node, custom resources) of every GPU pool: the shape compared across files."""
    shapes = []
    for t in types.values():
        if gpu_count(t):
            custom = {k: v for k, v in t["resources"].items()
                      if k not in STANDARD_RESOURCES and not k.startswith("accelerator_type")}
            shapes.append((gpu_count(t), tuple(sorted(custom.items()))))
    return sorted(shapes)


def check_pool_markers(types: dict[str, dict[str, Any]]) -> list[str]:
    problems = []
    seen: list[str] = []
    for name, t in types.items():
        custom = {k: v for k, v in t.get("resources", {}).items() if k.startswith("pool_")}
        if not gpu_count(t):
            if custom:
                problems.append(f"{name}: pool markers belong on GPU pools only, found {custom}")
            continue
        if len(custom) != 1:
            problems.append(f"{name}: a GPU pool needs exactly one pool_* marker, found {custom}")
            continue
        (marker, amount), = custom.items()
        if marker not in POOL_MARKERS:
            problems.append(f"{name}: marker {marker!r} is not one of {sorted(POOL_MARKERS)}")
        if amount != gpu_count(t):
            problems.append(f"{name}: {marker} is {amount}, must equal the node's "
                            f"{gpu_count(t)} GPUs (one unit per GPU)")
        seen.append(marker)
    if sorted(seen) != sorted(POOL_MARKERS):
        problems.append(f"GPU pool markers {sorted(seen)} != {sorted(POOL_MARKERS)}")
    return problems


def _covers(rule: dict[str, Any], port: int) -> bool:
    if str(rule.get("IpProtocol", "")) in ("-1", "all"):
        return True
    lo, hi = rule.get("FromPort"), rule.get("ToPort")
    return lo is not None and hi is not None and int(lo) <= port <= int(hi)


def _world(cidr: str) -> bool:
    try:
        return ipaddress.ip_network(cidr, strict=False).prefixlen == 0
    except ValueError:
        return False


def world_open_rules(node: Any, where: str = "") -> list[str]:
    """Security-group style rules anywhere in a config that open a Ray port to every address."""
    found = []
    if isinstance(node, dict):
        ranges = [r.get("CidrIp", "") for r in node.get("IpRanges", []) or []]
        ranges += [r.get("CidrIpv6", "") for r in node.get("Ipv6Ranges", []) or []]
        ranges += list(node.get("sourceRanges", []) or [])  # GCP firewall resources
        if any(_world(c) for c in ranges):
            ports = [p for p in RAY_PORTS if _covers(node, p)]
            allowed = node.get("allowed") or []
            ports += [p for p in RAY_PORTS for a in allowed
                      if not a.get("ports") or any(_port_in(p, s) for s in a["ports"])]
            if ports:
                found.append(f"{where or '/'}: opens {sorted(set(ports))} to the world")
        for k, v in node.items():
            found += world_open_rules(v, f"{where}/{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            found += world_open_rules(v, f"{where}/{i}")
    return found


def _port_in(port: int, spec: str) -> bool:
    lo, _, hi = str(spec).partition("-")
    return int(lo) <= port <= int(hi or lo)


def check_network_exposure(config: dict[str, Any]) -> list[str]:
    problems = world_open_rules(config)
    provider = config.get("provider", {})
    types = config.get("available_node_types", {})
    if provider.get("type") == "aws":
        # Ray's self-made group always adds SSH from 0.0.0.0/0; we bring our own instead.
        for name, t in types.items():
            if not t.get("node_config", {}).get("SecurityGroupIds"):
                problems.append(f"{name}: no SecurityGroupIds, so Ray would create a group "
                                "with SSH open to 0.0.0.0/0")
    if provider.get("type") == "gcp":
        for name, t in types.items():
            nc = t.get("node_config", {})
            nics = nc.get("networkInterfaces") or []
            subnets = [n.get("subnetwork") or "" for n in nics]
            if not subnets or any(not s or s.endswith("/default") for s in subnets):
                problems.append(f"{name}: must sit on the dedicated subnetwork, not the default "
                                "network (which allows SSH from anywhere)")
            if "dromedary-ray" not in (nc.get("tags") or {}).get("items", []):
                problems.append(f"{name}: missing the network tag the firewall rules select on")
    for cmd in config.get("head_start_ray_commands", []):
        m = re.search(r"--dashboard-host[= ](\S+)", cmd)
        if "ray start" in cmd and (not m or m.group(1) != "127.0.0.1"):
            problems.append("the head must bind the dashboard to 127.0.0.1 (reach it through "
                            "`ray dashboard`, an SSH tunnel)")
    return problems


def check_project_install(config: dict[str, Any]) -> list[str]:
    import ray

    problems = []
    mounts = config.get("file_mounts", {})
    if "." not in mounts.values():
        problems.append(f"file_mounts must copy the working tree ('.'), found {mounts}")
    target = next((k for k, v in mounts.items() if v == "."), "")
    target = target.replace("~", "$HOME")
    cmds = " ".join(config.get("setup_commands", []))
    if not re.search(r"pip install .*-e \"?" + re.escape(target) + r"\[gpu\]", cmds):
        problems.append(f"setup_commands must pip install -e the mounted tree with [gpu]: {cmds!r}")
    image = config.get("docker", {}).get("image", "")
    if image and f":{ray.__version__}-" not in image:
        problems.append(f"docker image {image} is not Ray {ray.__version__}")
    return problems


# --- checks: KubeRay manifests -----------------------------------------------------------------


def _containers(group: dict[str, Any]) -> list[dict[str, Any]]:
    return ((group.get("template") or {}).get("spec") or {}).get("containers") or []


def check_kuberay_cluster(manifest: dict[str, Any]) -> list[str]:
    import ray

    problems = []
    kind = manifest.get("kind")
    if manifest.get("apiVersion") != "ray.io/v1":
        problems.append(f"{kind}: apiVersion must be ray.io/v1")
    if not (manifest.get("metadata") or {}).get("name"):
        problems.append(f"{kind}: metadata.name is required")
    spec = cluster_spec(manifest)
    if spec.get("enableInTreeAutoscaling") is not True:
        problems.append(f"{kind}: enableInTreeAutoscaling must be true")
    if spec.get("rayVersion") != ray.__version__:
        problems.append(f"{kind}: rayVersion {spec.get('rayVersion')} != Ray {ray.__version__}")
    head = spec.get("headGroupSpec") or {}
    if "rayStartParams" not in head:
        problems.append(f"{kind}: headGroupSpec.rayStartParams is required")
    if str((head.get("rayStartParams") or {}).get("num-cpus")) != "0":
        problems.append(f"{kind}: the head must start with num-cpus 0")
    if head.get("serviceType", "ClusterIP") != "ClusterIP" or head.get("enableIngress"):
        problems.append(f"{kind}: the head Service must stay ClusterIP, without ingress")
    if not any(c.get("image") for c in _containers(head)):
        problems.append(f"{kind}: headGroupSpec.template needs a container image")
    groups = spec.get("workerGroupSpecs") or []
    gpu_groups = 0
    for g in groups:
        name = g.get("groupName")
        if not name:
            problems.append(f"{kind}: a worker group has no groupName")
        for key in ("minReplicas", "maxReplicas", "rayStartParams", "template"):
            if key not in g:
                problems.append(f"{kind}/{name}: {key} is required")
        containers = _containers(g)
        if not containers or not containers[0].get("image"):
            problems.append(f"{kind}/{name}: the template needs a container with an image")
            continue
        limits = (containers[0].get("resources") or {}).get("limits") or {}
        if name and name.startswith("gpu"):
            gpu_groups += 1
            if int(limits.get("nvidia.com/gpu", 0)) < 1:
                problems.append(f"{kind}/{name}: a GPU group needs an nvidia.com/gpu limit")
            if g.get("minReplicas") != 0:
                problems.append(f"{kind}/{name}: GPU groups must scale from zero (minReplicas: 0)")
        if (g.get("maxReplicas") or 0) < max(1, g.get("minReplicas") or 0):
            problems.append(f"{kind}/{name}: maxReplicas must be >= 1 and >= minReplicas")
    if gpu_groups < 2:
        problems.append(f"{kind}: expected two GPU worker groups, found {gpu_groups}")
    if problems:
        return problems
    try:
        auto = kuberay_autoscaling_config(manifest)
    except Exception as err:
        return [f"{kind}: the KubeRay autoscaler rejects the spec: {type(err).__name__}: {err}"]
    problems += [f"{kind}: {p}" for p in check_pool_markers(auto["available_node_types"])]
    return problems


def check_rayjob(job: dict[str, Any]) -> list[str]:
    spec = job.get("spec") or {}
    problems = []
    entry = spec.get("entrypoint", "")
    m = re.fullmatch(r"dromedary run (\S+)( .*)?", entry)
    if not m:
        return [f"entrypoint must run `dromedary run CONFIG`, found {entry!r}"]
    config = m.group(1)
    local = ROOT / config.removeprefix(IMAGE_PROJECT_DIR + "/")
    if not config.startswith("/"):
        problems.append("the config path must be absolute: a job without a working_dir has no "
                        "particular current directory")
    if not local.is_file():
        problems.append(f"entrypoint config {config} is not in the repository ({local})")
    if re.search(r"[;&|`$()]", entry):
        problems.append("no shell syntax in the entrypoint: KubeRay's submitter shell parses it")
    if spec.get("shutdownAfterJobFinishes") is not True:
        problems.append("shutdownAfterJobFinishes must be true (GPU pods outlive the job)")
    raw = spec.get("runtimeEnvYAML")
    if raw is None:
        problems.append("runtimeEnvYAML is missing")
    else:
        problems += [f"runtimeEnvYAML: {p}" for p in check_runtime_env(yaml.safe_load(raw))]
    return problems


def check_rayservice(svc: dict[str, Any]) -> list[str]:
    from ray.serve.schema import ServeDeploySchema

    from dromedary_ray.config import EngineConfig

    problems = []
    raw = (svc.get("spec") or {}).get("serveConfigV2")
    if not isinstance(raw, str):
        return ["serveConfigV2 must be a YAML string"]
    config = yaml.safe_load(raw)
    try:
        ServeDeploySchema.model_validate(config)
    except Exception as err:
        return [f"serveConfigV2 fails Ray Serve's schema: {err}"]
    app_source = ROOT / "dromedary_ray" / "serve" / "app.py"
    source = app_source.read_text() if app_source.exists() else ""
    markers = {}
    for g in cluster_spec(svc).get("workerGroupSpecs", []):
        markers.update(_start_param_resources(g))
    for app in config.get("applications") or []:
        path = app.get("import_path", "")
        module, _, attr = path.partition(":")
        if module != "dromedary_ray.serve.app" or not attr:
            problems.append(f"import_path {path!r} is not dromedary_ray.serve.app:<builder>")
        elif source and not re.search(rf"^def {re.escape(attr)}\(", source, re.M):
            problems.append(f"dromedary_ray/serve/app.py defines no {attr}()")
        key_env = (app.get("args") or {}).get("api_key_env")
        refs = key_refs(cluster_spec(svc), key_env) if key_env else []
        if key_env and (not refs or any(r.get("optional") for r in refs)):
            # build_app refuses an unset key, but an optional Secret hides the cause from
            # Kubernetes: the pods start and the app fails to deploy instead.
            problems.append(f"api_key_env {key_env}: each pod env entry for it must come "
                            "from a Secret that is not optional")
        engine = (app.get("args") or {}).get("engine") or {}
        try:
            cfg = EngineConfig(**engine)
        except Exception as err:
            problems.append(f"args.engine is not a valid EngineConfig: {err}")
            continue
        for dep in app.get("deployments") or []:
            name = dep.get("name")
            if source and not re.search(rf"^class {re.escape(str(name))}\b", source, re.M):
                problems.append(f"deployment {name!r}: no such class in dromedary_ray/serve/app.py")
            auto = dep.get("autoscaling_config") or {}
            for key in ("min_replicas", "max_replicas", "target_ongoing_requests"):
                if key not in auto:
                    problems.append(f"deployment {name}: autoscaling_config.{key} is missing")
            opts = dep.get("ray_actor_options") or {}
            if opts.get("num_gpus") != cfg.gpus_per_engine or \
                    cfg.gpus_per_engine != cfg.tensor_parallel_size:
                problems.append(f"deployment {name}: num_gpus {opts.get('num_gpus')}, "
                                f"gpus_per_engine {cfg.gpus_per_engine} and tensor_parallel_size "
                                f"{cfg.tensor_parallel_size} must agree")
            for res, amount in (opts.get("resources") or {}).items():
                if markers.get(res, 0) < amount:
                    problems.append(f"deployment {name}: asks for {res}: {amount}, which no "
                                    "worker group offers")
    return problems


def _start_param_resources(group: dict[str, Any]) -> dict[str, int]:
    raw = (group.get("rayStartParams") or {}).get("resources")
    return json.loads(raw[1:-1].replace("\\", "")) if raw else {}


# --- checks: runtime env -----------------------------------------------------------------------


def check_runtime_env(env: Any) -> list[str]:
    from ray.runtime_env import RuntimeEnv

    if not isinstance(env, dict):
        return ["a runtime env must be a mapping"]
    public = {k for k in RuntimeEnv.known_fields if not k.startswith("_")}
    problems = [f"{k!r} is not a runtime_env key Ray knows ({sorted(public)})"
                for k in env if k not in public]
    try:
        RuntimeEnv(**env)
    except Exception as err:
        problems.append(f"RuntimeEnv rejects it: {err}")
    return problems


def check_runtime_env_file(path: Path) -> list[str]:
    from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args

    env = yaml.safe_load(path.read_text())
    problems = check_runtime_env(env)
    if problems:
        return problems
    # Exactly what `ray job submit --runtime-env FILE --working-dir .` builds.
    merged = parse_runtime_env_args(runtime_env=str(path), working_dir=".")
    if merged.get("working_dir") != ".":
        problems.append("--working-dir must win over the file")
    excludes = env.get("excludes") or []
    for needed in (".venv/", "runs/"):
        if needed not in excludes:
            problems.append(f"excludes must keep {needed} out of the upload")
    if "pip" in env or "uv" in env or "conda" in env:
        problems.append("no per-job package installs: the nodes already have the project")
    return problems


# --- the tests ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", AUTOSCALER_FILES)
def test_autoscaler_config_matches_ray_schema(name):
    assert check_ray_schema(load_autoscaler(name)) == []


@pytest.mark.parametrize("name", AUTOSCALER_FILES)
def test_autoscaler_config_passes_ray_validator(name):
    assert check_ray_validator(load_autoscaler(name)) == []


@pytest.mark.parametrize("name", AUTOSCALER_FILES)
def test_autoscaler_node_types(name):
    assert check_node_types(load_autoscaler(name)) == []


@pytest.mark.parametrize("name", AUTOSCALER_FILES)
def test_autoscaler_pool_shapes(name):
    assert check_pool_markers(load_autoscaler(name)["available_node_types"]) == []


@pytest.mark.parametrize("name", AUTOSCALER_FILES)
def test_autoscaler_keeps_ray_ports_private(name):
    assert check_network_exposure(load_autoscaler(name)) == []


@pytest.mark.parametrize("name", AUTOSCALER_FILES)
def test_autoscaler_installs_the_project(name):
    assert check_project_install(load_autoscaler(name)) == []


def test_same_pools_everywhere():
    """AWS, GCP and the three KubeRay specs offer the same GPU pools with the same markers."""
    shapes = {name: pool_shapes(load_autoscaler(name)["available_node_types"])
              for name in AUTOSCALER_FILES}
    for name, manifest in manifests().items():
        shapes[name] = pool_shapes(kuberay_autoscaling_config(manifest)["available_node_types"])
    expected = shapes["aws.yaml"]
    assert {name for _, custom in expected for name, _ in custom} == POOL_MARKERS
    assert {name: s for name, s in shapes.items() if s != expected} == {}


@pytest.mark.parametrize("name", KUBERAY_FILES)
def test_kuberay_manifest(name):
    assert check_kuberay_cluster(manifests()[name]) == []


def test_kuberay_specs_are_one_spec():
    found = manifests()
    base = without_key_optionality(cluster_spec(found["raycluster.yaml"]))
    assert {n: True for n, m in found.items()
            if without_key_optionality(cluster_spec(m)) != base} == {}


def test_rayjob_runs_the_paper_config():
    assert check_rayjob(manifests()["rayjob.yaml"]) == []


def test_rayservice_serves_through_our_app():
    assert check_rayservice(manifests()["rayservice.yaml"]) == []


def test_runtime_env_file():
    assert check_runtime_env_file(CLUSTER / "runtime_env.yaml") == []


def test_readme_commands_open_nothing_to_the_world():
    """The security group and firewall commands in cluster/README.md name no world-wide range."""
    text = (CLUSTER / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", text, re.S)
    assert any("authorize-security-group-ingress" in b for b in blocks)
    assert any("firewall-rules create" in b for b in blocks)
    assert [b for b in blocks if "0.0.0.0/0" in b or "::/0" in b] == []


# --- the checks themselves can fail ------------------------------------------------------------


def _aws() -> dict[str, Any]:
    return load_autoscaler("aws.yaml")


def _gcp() -> dict[str, Any]:
    return load_autoscaler("gcp.yaml")


def _edit(config: dict[str, Any], fn) -> dict[str, Any]:
    config = copy.deepcopy(config)
    fn(config)
    return config


def _set(path: str, value: Any):
    def fn(config):
        *parents, last = path.split(".")
        node = config
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value
    return fn


_DELETE = object()
_WORLD_DASHBOARD = {"GroupName": "x", "IpPermissions": [
    {"IpProtocol": "tcp", "FromPort": 8265, "ToPort": 8265, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]}
_WORLD_ALL = {"GroupName": "x", "IpPermissions": [
    {"IpProtocol": "-1", "Ipv6Ranges": [{"CidrIpv6": "::/0"}]}]}

BROKEN_AUTOSCALER = [
    (check_ray_schema, _aws, _set("max_wokers", 3)),
    (check_ray_schema, _aws, _set("available_node_types.gpu_training.resources.GPU", "8")),
    (check_ray_validator, _aws, _set("head_node_type", "ray.head.default")),
    (check_ray_validator, _gcp, _set("available_node_types.head.node_config", _DELETE)),
    (check_node_types, _aws, _set("available_node_types.gpu_generation.min_workers", 1)),
    (check_node_types, _gcp, _set("available_node_types.head.resources", {"CPU": 8})),
    (check_node_types, _aws, _set("max_workers", 4)),
    (check_network_exposure, _aws, _set("provider.security_group", _WORLD_DASHBOARD)),
    (check_network_exposure, _aws, _set("provider.security_group", _WORLD_ALL)),
    (check_network_exposure, _aws,
     _set("available_node_types.gpu_training.node_config.SecurityGroupIds", _DELETE)),
    (check_network_exposure, _gcp,
     _set("available_node_types.cpu_worker.node_config.networkInterfaces", _DELETE)),
    (check_network_exposure, _gcp, _set("head_start_ray_commands", [
        "ray start --head --port=6379 --dashboard-host=0.0.0.0"])),
    (check_project_install, _aws, _set("setup_commands", ["pip install dromedary-ray"])),
    (check_project_install, _gcp, _set("docker.image", "rayproject/ray:2.9.0-py311-gpu")),
]

BROKEN_POOLS = [
    _set("gpu_training.resources.pool_training", 1),
    _set("gpu_generation.resources", {"CPU": 96, "GPU": 8, "pool_gen": 8}),
    _set("cpu_worker.resources", {"CPU": 16, "pool_generation": 1}),
]


def _job():
    return manifests()["rayjob.yaml"]


def _service():
    return manifests()["rayservice.yaml"]


def _cluster():
    return manifests()["raycluster.yaml"]


_GEN = "spec.workerGroupSpecs.1"  # the gpu-generation group


def _serve_edit(fn):
    def outer(svc):
        config = yaml.safe_load(svc["spec"]["serveConfigV2"])
        fn(config)
        svc["spec"]["serveConfigV2"] = yaml.safe_dump(config)
    return outer


def _dep(config):
    return config["applications"][0]["deployments"][0]


BROKEN_KUBERAY = [
    (check_kuberay_cluster, _cluster, _set("apiVersion", "ray.io/v1alpha1")),
    (check_kuberay_cluster, _cluster, _set("spec.enableInTreeAutoscaling", False)),
    (check_kuberay_cluster, _cluster, _set("spec.headGroupSpec.serviceType", "LoadBalancer")),
    (check_kuberay_cluster, _cluster, _set(f"{_GEN}.minReplicas", 2)),
    (check_kuberay_cluster, _cluster, _set(f"{_GEN}.maxReplicas", _DELETE)),
    (check_kuberay_cluster, _cluster,
     _set(f"{_GEN}.template.spec.containers.0.resources.limits", {"cpu": "8"})),
    (check_kuberay_cluster, _cluster,
     _set(f"{_GEN}.rayStartParams.resources", '"{\\"pool_generation\\": 1}"')),
    (check_kuberay_cluster, _cluster,
     _set(f"{_GEN}.rayStartParams.resources", '"{\\"pool_generation\\": 8.5}"')),
    (check_kuberay_cluster, _cluster, _set(f"{_GEN}.template.spec.containers.0.image", "")),
    (check_rayjob, _job, _set("spec.entrypoint", "python train.py")),
    (check_rayjob, _job, _set("spec.entrypoint", "dromedary run configs/nope.yaml")),
    (check_rayjob, _job, _set("spec.entrypoint", "cd /x && dromedary run "
                                                 "/home/ray/dromedary-ray/configs/local.yaml")),
    (check_rayjob, _job, _set("spec.shutdownAfterJobFinishes", False)),
    (check_rayjob, _job, _set("spec.runtimeEnvYAML", "env_vars: {A: 1}\n")),
    (check_rayjob, _job, _set("spec.runtimeEnvYAML", "envvars: {A: '1'}\n")),
    (check_rayservice, _service, _set("spec.serveConfigV2", "applications: [{name: x}]")),
    (check_rayservice, _service,
     _serve_edit(lambda c: c["applications"][0].update(import_path="app:build"))),
    (check_rayservice, _service,
     _serve_edit(lambda c: _dep(c).update(name="NoSuchDeployment"))),
    (check_rayservice, _service,
     _serve_edit(lambda c: _dep(c)["autoscaling_config"].pop("target_ongoing_requests"))),
    (check_rayservice, _service,
     _serve_edit(lambda c: _dep(c)["ray_actor_options"].update(num_gpus=2))),
    (check_rayservice, _service,
     _serve_edit(lambda c: _dep(c)["ray_actor_options"].update(resources={"pool_serving": 4}))),
    (check_rayservice, _service,
     _serve_edit(lambda c: c["applications"][0]["args"]["engine"].update(dtype="fp8"))),
    (check_rayservice, _service, _set(
        "spec.rayClusterConfig.headGroupSpec.template.spec.containers.0.env.0.valueFrom"
        ".secretKeyRef.optional", True)),
]

BROKEN_RUNTIME_ENVS = [
    {"working_dir": ".", "excludes": ".venv/"},
    {"env_vars": {"TOKENIZERS_PARALLELISM": False}},
    {"enviroment": {"A": "1"}},
    "just a string",
]


@pytest.mark.parametrize("check, base, breakage", BROKEN_AUTOSCALER + BROKEN_KUBERAY,
                         ids=lambda x: getattr(x, "__name__", None) or "")
def test_checks_catch_broken_configs(check, base, breakage):
    original = base()
    assert check(original) == [], "the shipped file must pass before it is broken"
    assert check(_edit(original, breakage)) != []


@pytest.mark.parametrize("breakage", BROKEN_POOLS)
def test_pool_marker_check_catches_broken_pools(breakage):
    types = _aws()["available_node_types"]
    assert check_pool_markers(_edit(types, breakage)) != []


@pytest.mark.parametrize("env", BROKEN_RUNTIME_ENVS)
def test_runtime_env_check_catches_broken_envs(env):
    assert check_runtime_env(env) != []


def test_cross_file_comparisons_catch_drift():
    found = manifests()
    drifted = _edit(found["rayjob.yaml"], _set(
        "spec.rayClusterSpec.workerGroupSpecs.2.maxReplicas", 16))
    assert cluster_spec(drifted) != cluster_spec(found["raycluster.yaml"])
    renamed = _edit(_gcp()["available_node_types"], _set(
        "gpu_training.resources", {"CPU": 208, "GPU": 8, "pool_train": 8}))
    assert pool_shapes(renamed) != pool_shapes(_aws()["available_node_types"])
