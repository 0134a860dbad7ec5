"""Training: configuration, data, parallelism, checkpoints, metrics and the cluster planner."""
