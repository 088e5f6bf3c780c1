"""Ray-facing shells: cluster connection, Ray Data generation runner, fault hooks."""
