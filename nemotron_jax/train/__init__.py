"""Training: optimizer and schedule, the pure train step, meshes, checkpoints."""
