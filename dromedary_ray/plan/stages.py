"""What each stage runs on: the one table to extend when a recipe gains a stage.

A stage generates (vLLM engines from the `engine` section), trains (Ray Train workers from its
config section's `train` block), does both one after the other (verbose cloning: answer, then
fine-tune), both at once (PPO: rollout engines and a reward-model engine beside the trainer
group, `workload._ppo` and `planner._scoring`), or neither (`seeds` reads a file in the
driver). A stage missing here is an error naming it, so a new stage cannot be planned as
something it is not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dromedary_ray.plan.specs import PlanError


@dataclass(frozen=True)
class StageKind:
    generate: bool = False  # runs generation engines (the `engine` section)
    train: bool = False  # runs Ray Train workers (its section's `train` block)
    concurrent: bool = False  # both phases hold their GPUs at the same time (PPO)
    section: str | None = None  # dotted config section of `train`/`sampling`; None: the stage


DRIVER = StageKind()
GENERATE = StageKind(generate=True)
TRAIN = StageKind(train=True)
GENERATE_THEN_TRAIN = StageKind(generate=True, train=True)

STAGE_KINDS: dict[str, StageKind] = {
    "seeds": DRIVER,
    "synthesize": GENERATE,
    "self_align": GENERATE,
    "engrave": TRAIN,
    "verbose_clone": GENERATE_THEN_TRAIN,
    # I-SHEEP: one iteration answers its prompts, grades the pairs, fine-tunes on the best.
    "answer": StageKind(generate=True, section="isheep.answer"),
    "assess": StageKind(generate=True, section="isheep.assess"),
    "sft": StageKind(train=True, section="isheep"),
    # SALMON
    "preferences": GENERATE,
    "reward_model": TRAIN,
    "ppo": StageKind(generate=True, train=True, concurrent=True),
}


def stage_kind(stage: str) -> StageKind:
    try:
        return STAGE_KINDS[stage]
    except KeyError:
        raise PlanError(f"stage {stage!r}: the planner does not know what it runs on; add it to "
                        "STAGE_KINDS in dromedary_ray/plan/stages.py") from None


def stage_section(config: Any, stage: str) -> Any:
    """The config section (dotted path) a stage reads `train`/`sampling` from, or None."""
    node = config
    for part in (stage_kind(stage).section or stage).split("."):
        node = getattr(node, part, None)
    return node


def section_name(stage: str) -> str:
    return stage_kind(stage).section or stage
