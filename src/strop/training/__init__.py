"""The training loop (`fit`), optimizers and schedules, and checkpoints."""
