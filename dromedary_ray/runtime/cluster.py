"""Connecting to Ray: join the cluster named in the config or by `ray job submit`, else start a
local one bound to 127.0.0.1."""

from __future__ import annotations

import logging
import os

from dromedary_ray.config import RayConfig

log = logging.getLogger(__name__)

# Engines log every request at INFO; the driver's own progress bar says what matters.
WORKER_ENV = {"VLLM_LOGGING_LEVEL": "ERROR", "TOKENIZERS_PARALLELISM": "false"}


def connect(cfg: RayConfig) -> None:
    import ray

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


def shutdown() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
