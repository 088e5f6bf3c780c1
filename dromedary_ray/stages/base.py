"""What every stage provides to the driver, and what the driver hands each stage."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import pyarrow as pa

from dromedary_ray.config import RunConfig
from dromedary_ray.data.store import StageStore


@dataclass
class StageContext:
    config: RunConfig
    store: StageStore  # this stage's folder
    inputs: dict[str, StageStore]  # upstream stages' folders, by name
    metrics: dict[str, Any] = field(default_factory=dict)  # the stage fills these in


class Stage(Protocol):
    name: str
    inputs: tuple[str, ...]
    data_schema: pa.Schema

    def fingerprint_payload(self, config: RunConfig) -> dict[str, Any]:
        """Everything that changes this stage's output besides its inputs."""
        ...

    def check(self, config: RunConfig) -> None:
        """Validate the files this stage will read; raise before anything starts."""
        ...

    def run(self, ctx: StageContext) -> None:
        """Produce (or finish producing) the stage's tables in `ctx.store`."""
        ...
