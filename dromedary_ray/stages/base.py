"""What every stage provides to the driver, and what the driver hands each stage."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import pyarrow as pa

from dromedary_ray.config import RunConfig
from dromedary_ray.data.store import StageStore

PROMPT_STAGES = ("synthesize", "seeds")  # stages that write a PromptRow table


def prompt_source(config: RunConfig) -> str:
    """The recipe's prompts table: synthetic prompts where the recipe makes them, else seeds."""
    for name in PROMPT_STAGES:
        if name in config.stages:
            return name
    raise ValueError(f"recipe {config.recipe!r} has no prompt stage ({', '.join(PROMPT_STAGES)})")


SFT_STAGES = ("verbose_clone", "engrave")  # the recipe's supervised model: the last of these


def sft_stage(config: RunConfig) -> str:
    """The stage whose model SALMON starts from: verbose_clone where the recipe has it."""
    for name in SFT_STAGES:
        if name in config.stages:
            return name
    raise ValueError(f"recipe {config.recipe!r} has no supervised stage ({', '.join(SFT_STAGES)})")


def generation_fingerprint(config: RunConfig) -> dict[str, Any]:
    """What, besides a stage's own section, changes the text a generation stage samples."""
    engine = config.engine
    return {"model": config.model,
            "engine": {"backend": engine.backend, "dtype": engine.dtype,
                       "max_model_len": engine.max_model_len}}


@dataclass
class StageContext:
    """What the driver hands a stage: the config, its own folder and its inputs' folders."""

    config: RunConfig
    store: StageStore  # this stage's folder
    inputs: dict[str, StageStore]  # upstream stages' folders, by name
    metrics: dict[str, Any] = field(default_factory=dict)  # the stage fills these in
    # The driver's engine pools (runtime.generate.Engines), kept up across generation passes
    # on one model; None: each pass starts and stops its own.
    engines: Any = None

    def only_input(self) -> StageStore:
        (store,) = self.inputs.values()
        return store


class Stage(Protocol):
    name: str
    data_schema: pa.Schema
    uses_ray: bool  # the driver connects to Ray before the first stage that does
    trains: bool  # the driver stops the engines before it: training needs their GPUs and memory

    def input_stages(self, config: RunConfig) -> tuple[str, ...]:
        """The stages whose outputs this one reads, in this recipe."""
        ...

    def fingerprint_payload(self, config: RunConfig) -> dict[str, Any]:
        """Everything that changes this stage's output besides its inputs."""
        ...

    def check(self, config: RunConfig) -> None:
        """Validate the files this stage will read; raise before anything starts."""
        ...

    def run(self, ctx: StageContext) -> None:
        """Produce (or finish producing) the stage's tables in `ctx.store`."""
        ...
