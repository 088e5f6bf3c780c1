"""Ray-facing shells: cluster connection, the generation runner, Ray Train loops, PPO actors,
fault hooks."""
