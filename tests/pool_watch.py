"""Count a cluster's live worker nodes per pool, once a second, into a JSON-lines file.

    python tests/pool_watch.py 127.0.0.1:6379 samples.jsonl

Each line: {"t": unix time, "gpu_generation": n, "gpu_training": n, "cpu_worker": n}. A node's
pool is read from its resources (the pool markers of cluster/local-sim.yaml), which is what the
autoscaler launched it for. It runs as its own Ray driver process, so the test process never
joins the simulated cluster.
"""

from __future__ import annotations

import json
import os
import sys
import time

POOLS = ("gpu_generation", "gpu_training", "cpu_worker")


def pool_of(resources: dict[str, float]) -> str | None:
    if "pool_generation" in resources:
        return "gpu_generation"
    if "pool_training" in resources:
        return "gpu_training"
    return "cpu_worker" if resources.get("CPU", 0) > 0 else None  # None: the CPU-0 head


def count(nodes: list[dict]) -> dict[str, int]:
    counts = dict.fromkeys(POOLS, 0)
    for node in nodes:
        pool = pool_of(node["Resources"]) if node["Alive"] else None
        if pool:
            counts[pool] += 1
    return counts


def main(address: str, out_path: str, every_s: float = 1.0) -> None:
    # Both are read when Ray is imported: loopback only, and the token the cluster requires.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ["RAY_AUTH_MODE"] = "token"
    import ray

    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    with open(out_path, "a") as out:
        while True:
            out.write(json.dumps({"t": time.time(), **count(ray.nodes())}) + "\n")
            out.flush()
            time.sleep(every_s)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
