"""seeds: the shipped (or the user's) Self-Instruct seed file as the prompts table."""

from __future__ import annotations

from typing import Any

from dromedary_ray.config import RunConfig, resolve_path
from dromedary_ray.data.schemas import PromptRow, RejectRow
from dromedary_ray.data.store import file_digest
from dromedary_ray.principles import load_seed_tasks
from dromedary_ray.stages.base import StageContext


class SeedsStage:
    name = "seeds"
    data_schema = PromptRow.SCHEMA
    uses_ray = False
    trains = False

    def input_stages(self, config: RunConfig) -> tuple[str, ...]:
        return ()

    def fingerprint_payload(self, config: RunConfig) -> dict[str, Any]:
        return {"seeds": config.section("seeds"),
                "file": file_digest(resolve_path(config.seeds.file))}

    def check(self, config: RunConfig) -> None:
        load_seed_tasks(config.seeds.file)

    def run(self, ctx: StageContext) -> None:
        cfg = ctx.config.seeds
        tasks = load_seed_tasks(cfg.file)  # raises naming the file and line of a broken row
        if cfg.max_prompts is not None:
            tasks = tasks[: cfg.max_prompts]
        rows = [PromptRow(id=t.id, source="seed", query=t.query) for t in tasks]
        ctx.store.write_table(PromptRow.to_table(rows), RejectRow.empty())
        ctx.metrics["prompts"] = len(rows)
