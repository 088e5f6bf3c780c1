"""SALMON's RL stage on Ray: rollout, reward and trainer actors and the loop that drives them.

- `rollout.RolloutActor`: a vLLM engine (transformers where vLLM is absent) that samples
  responses and takes the trainer's new weights in place.
- `reward.RewardActor`: scores responses with the principle-following reward model (or a plain
  Python function, for tests and benchmarks).
- `trainer.PPOTrainer`: policy, critic and frozen reference in one process (plain PyTorch).
- `loop.run_ppo`: the driver loop, generate -> score -> reference -> advantages -> update -> sync.

Nothing heavy is imported here; each module imports Ray, vLLM or torch where it needs them.
"""
