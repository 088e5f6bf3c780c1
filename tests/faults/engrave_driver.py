"""A driver process for the training fault cases: run the engrave stage alone, as `dromedary run`
would, on a hand-written self_align table (so no generation stage runs first).

    python tests/faults/engrave_driver.py RUN_DIR [override ...]

Prints one JSON line with the stage report. The tests SIGKILL this process mid-training and
run it again on the same RUN_DIR, which must resume the stage, not restart it.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from dromedary_ray.config import PROJECT_ROOT, load_config
from dromedary_ray.data.schemas import RejectRow, SelfAlignRow
from dromedary_ray.data.store import StageStore
from dromedary_ray.pipeline.driver import run_stage
from dromedary_ray.runtime.cluster import connect

REPORT = "ENGRAVE-REPORT "  # marks our line among the workers' forwarded output
COLOURS = ["red", "blue", "green", "white", "black", "yellow", "orange", "purple"]


def self_align_rows() -> list[SelfAlignRow]:
    """Sixteen short answers the tiny model can learn in a few steps."""
    return [SelfAlignRow(id=f"q{i:02d}", query=f"What colour is item number {i}?",
                         thoughts="A simple question (2 helpful).",
                         answer=f"Item number {i} is {COLOURS[i % 8]}. I hope this helps!",
                         prompt_tokens=0, completion_tokens=0, mean_logprob=0.0,
                         finish_reason="stop")
            for i in range(16)]


def main(run_dir: str, overrides: list[str]) -> None:
    store = StageStore(run_dir, "self_align")
    if not store.committed_shards():  # a resumed driver finds it written already
        store.write_table(SelfAlignRow.to_table(self_align_rows()), RejectRow.empty())
    config = load_config(PROJECT_ROOT / "configs/local.yaml", [f"run_dir={run_dir}", *overrides])
    connect(config.ray)
    report = run_stage(config, "engrave", {"self_align": "hand-written"})
    print(REPORT + json.dumps(dataclasses.asdict(report), default=str), flush=True)


if __name__ == "__main__":
    main(str(Path(sys.argv[1]).resolve()), sys.argv[2:])
