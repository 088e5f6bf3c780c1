"""PPO's trainer options (`ppo.trainer`, `trainer_workers`, `micro_batch_size`, `lora`, ...):
validation, the TrainConfig they derive, and the small contracts around weight sync. No Ray,
no models; milliseconds."""

import pytest

from dromedary_ray.config import (
    PROJECT_ROOT,
    EngineConfig,
    PPOConfig,
    PPOLoRAConfig,
    load_config,
)
from dromedary_ray.errors import ConfigError, DromedaryError


def test_defaults_keep_the_one_process_trainer():
    cfg = PPOConfig()
    assert (cfg.trainer, cfg.trainer_workers, cfg.lora, cfg.micro_batch_size) == \
        ("torch", 1, None, None)
    assert cfg.rows_per_forward == cfg.mini_batch_size  # the whole minibatch at once
    local = load_config(PROJECT_ROOT / "configs" / "local.yaml").ppo
    assert local.trainer == "torch" and local.lora is None


@pytest.mark.parametrize("overrides,message", [
    (dict(trainer="jax"), r"^trainer: must be torch or deepspeed"),
    (dict(trainer_workers=2), r"^trainer_workers: must be 1 for trainer torch"),
    (dict(trainer="deepspeed", trainer_workers=3), r"^trainer_workers: must divide "
                                                   r"mini_batch_size 8"),
    (dict(trainer="deepspeed", trainer_workers=2, micro_batch_size=3),
     r"^micro_batch_size: must divide a rank's 4 rows"),
    (dict(micro_batch_size=3), r"^micro_batch_size: must divide a rank's 8 rows"),
    (dict(bf16=True), r"^bf16: bf16 and gradient_checkpointing are deepspeed"),
    (dict(rollout_engines=0), r"^rollout_engines: must be >= 1"),
])
def test_trainer_options_are_validated(overrides, message):
    with pytest.raises(ConfigError, match=message):
        PPOConfig(**overrides)


def test_lora_section_loads_from_yaml_and_is_validated():
    config = load_config(PROJECT_ROOT / "configs" / "local.yaml",
                         ["ppo.lora.rank=8", "ppo.lora.target_modules=[q_proj, v_proj]"])
    assert config.ppo.lora == PPOLoRAConfig(rank=8, target_modules=("q_proj", "v_proj"))
    with pytest.raises(ConfigError, match=r"^ppo\.lora\.rank: must be in \[1, 512\]"):
        load_config(PROJECT_ROOT / "configs" / "local.yaml", ["ppo.lora.rank=1024"])


def test_train_config_is_what_the_group_and_the_planner_use():
    cfg = PPOConfig(trainer="deepspeed", trainer_workers=4, mini_batch_size=16,
                    micro_batch_size=2, bf16=True, gradient_checkpointing=True,
                    lora=PPOLoRAConfig(rank=32, alpha=64), learning_rate=2e-5, ppo_epochs=3)
    train = cfg.train_config(EngineConfig(gpus_per_engine=4, cpus_per_engine=8,
                                          max_model_len=2048))
    assert (train.method, train.lora_rank, train.lora_alpha) == ("lora", 32, 64)
    assert (train.num_workers, train.use_gpu, train.cpus_per_worker) == (4, True, 8.0)
    assert (train.micro_batch_size, train.max_seq_len, train.epochs) == (2, 2048, 3)
    assert (train.zero_stage, train.bf16, train.gradient_checkpointing) == (3, True, True)
    whole_share = PPOConfig(trainer="deepspeed", trainer_workers=2).train_config(EngineConfig())
    assert (whole_share.micro_batch_size, whole_share.method, whole_share.use_gpu) == \
        (4, "full", False)


def test_salmon_70b_ppo_section_is_salmons():
    ppo = load_config(PROJECT_ROOT / "configs" / "salmon-70b.yaml").ppo
    assert (ppo.prompts_per_step, ppo.mini_batch_size, ppo.ppo_epochs) == (576, 288, 2)
    assert (ppo.learning_rate, ppo.kl_coef, ppo.sampling.temperature) == (2e-5, 0.01, 0.7)
    assert ppo.sampling.max_new_tokens == 1024
    assert ppo.length_bonus_per_token * 1024 == pytest.approx(5.0) and ppo.max_bonus == 4.0
    assert ppo.unfinished_penalty == 6.0 and ppo.principles_per_prompt == 3
    assert ppo.value_init == "reward_model" and ppo.trainer == "deepspeed"


def test_weights_update_carries_exactly_one_kind_and_lora_ranks_map_to_vllms():
    from dromedary_ray.runtime.ppo.rollout import WeightsUpdate, vllm_lora_rank

    assert WeightsUpdate(3, folder="/x").folder == "/x"
    with pytest.raises(ValueError, match="exactly one"):
        WeightsUpdate(3)
    with pytest.raises(ValueError, match="exactly one"):
        WeightsUpdate(3, folder="/x", adapter="/y")
    assert [vllm_lora_rank(r) for r in (1, 4, 8, 9, 64, 300, 512)] == \
        [1, 8, 8, 16, 64, 320, 512]
    with pytest.raises(DromedaryError, match="over vLLM's largest"):
        vllm_lora_rank(600)


@pytest.mark.parametrize("name", ["call_timeout_s", "update_timeout_s", "start_timeout_s"])
def test_deadlines_must_be_positive_and_the_update_gets_the_longest(name):
    for bad in ("0", "-1", ".inf"):  # Ray takes a deadline as whole milliseconds: finite
        with pytest.raises(ConfigError, match=rf"^ppo\.{name}: must be > 0 and finite"):
            load_config(None, [f"ppo.{name}={bad}"])
    cfg = PPOConfig()
    # An update on SmolLM2 takes ~80 s on this CPU; a step's other calls are shorter.
    assert cfg.call_timeout_s < cfg.update_timeout_s and cfg.call_timeout_s >= 300


def test_raising_a_deadline_keeps_the_stage_and_its_checkpoints():
    """The error tells the user to raise a deadline and run again: that must resume, not clear
    the stage (a new stage fingerprint) or skip the checkpoints (a new run fingerprint)."""
    from dromedary_ray.data.schemas import PromptRow
    from dromedary_ray.runtime.ppo.loop import run_fingerprint
    from dromedary_ray.stages.ppo import PPOStage

    def fingerprints(*overrides: str) -> tuple:
        config = load_config(PROJECT_ROOT / "configs" / "local.yaml", list(overrides))
        run = run_fingerprint([PromptRow("p1", "seed", "Name a prime.")], "/m", "/rm", None,
                              config.ppo, config.engine)
        return PPOStage().fingerprint_payload(config), run

    same = fingerprints()
    assert fingerprints("ppo.call_timeout_s=5", "ppo.update_timeout_s=7",
                        "ppo.start_timeout_s=9") == same
    stage, run = fingerprints("ppo.learning_rate=2.0e-6")  # what is computed still counts
    assert stage != same[0] and run != same[1]
