"""SALMON's RL stage on Ray: rollout, reward and trainer actors and the loop that drives them.

- `rollout.RolloutActor`: a vLLM engine (transformers where vLLM is absent) that samples
  responses and takes the trainer's new weights in place.
- `reward.RewardActor`: scores responses with the principle-following reward model (or a plain
  Python function, for tests and benchmarks).
- `trainer.PPOTrainer`: policy, critic and frozen reference in one process (plain PyTorch).
- `ds_trainer.PPOTrainerGroup`: the same calls over DeepSpeed ZeRO-3 ranks (`ppo.trainer:
  deepspeed`), for models that do not fit one process.
- `forward.py`: the batch, forward passes and losses both trainers share.
- `loop.run_ppo`: the driver loop, generate -> score -> reference -> advantages -> update -> sync.

Nothing heavy is imported here; each module imports Ray, vLLM or torch where it needs them.
"""
