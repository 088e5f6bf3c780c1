"""Connecting to Ray: join the cluster named in the config or by `ray job submit`, else start a
local one bound to 127.0.0.1."""

from __future__ import annotations

import logging
import os

from dromedary_ray.config import RayConfig

log = logging.getLogger(__name__)

# Engines log every request at INFO; the driver's own progress bar says what matters.
WORKER_ENV = {"VLLM_LOGGING_LEVEL": "ERROR", "TOKENIZERS_PARALLELISM": "false"}
POOL_KINDS = ("generation", "training")

# The pool markers of the config this process connected with (kind -> custom resource). They
# belong to the cluster connection, which Ray keeps per process too: kept here, the runners ask
# for them without every stage threading the Ray config through to its resource requests.
_pools: dict[str, str] = {}


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on at `host` now (the OS's pick), for a server about to start."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def use_pools(cfg: RayConfig) -> None:
    """Ask for `cfg`'s pool markers from now on (none where it names none)."""
    _pools.clear()
    _pools.update({kind: name for kind, name in
                   (("generation", cfg.generation_pool), ("training", cfg.training_pool)) if name})


def connect(cfg: RayConfig) -> None:
    import ray

    use_pools(cfg)  # also when already connected: the run's config decides, not an earlier one
    if ray.is_initialized():
        return
    # Without this Ray advertises a non-loopback address and its GCS listens on all interfaces.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    runtime_env = {"env_vars": dict(WORKER_ENV)}
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        return
    log.info("starting a local Ray cluster on 127.0.0.1")
    ray.init(
        address="local",  # a new cluster even where `ray start` left one for ray.init to find
        num_cpus=cfg.num_cpus,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        runtime_env=runtime_env,
        configure_logging=True,
        logging_level=logging.WARNING,
    )


def pool_resources(kind: str, units: float) -> dict[str, float]:
    """The custom resource that pins work of `kind` to its node pool, `units` of it; empty when
    the connected config names no pool for that kind (local runs)."""
    if kind not in POOL_KINDS:
        raise ValueError(f"pool kind must be one of {POOL_KINDS}, got {kind!r}")
    if units <= 0:
        raise ValueError(f"pool units must be > 0, got {units}")
    name = _pools.get(kind)
    return {name: units} if name else {}


def shutdown() -> None:
    import ray

    _pools.clear()
    if ray.is_initialized():
        ray.shutdown()
