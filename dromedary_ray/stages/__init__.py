"""One module per stage: what it reads, what it writes. `STAGES` maps names to stages."""

from __future__ import annotations

from dromedary_ray.stages.answer import AnswerStage
from dromedary_ray.stages.assess import AssessStage
from dromedary_ray.stages.base import Stage
from dromedary_ray.stages.engrave import EngraveStage
from dromedary_ray.stages.ppo import PPOStage
from dromedary_ray.stages.preferences import PreferencesStage
from dromedary_ray.stages.reward_model import RewardModelStage
from dromedary_ray.stages.seeds import SeedsStage
from dromedary_ray.stages.self_align import SelfAlignStage
from dromedary_ray.stages.sft import SftStage
from dromedary_ray.stages.synthesize import SynthesizeStage
from dromedary_ray.stages.verbose_clone import VerboseCloneStage

STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        SeedsStage(),
        SynthesizeStage(),
        SelfAlignStage(),
        EngraveStage(),
        VerboseCloneStage(),
        AnswerStage(),
        AssessStage(),
        SftStage(),
        PreferencesStage(),
        RewardModelStage(),
        PPOStage(),
    )
}
