"""strop: fine-tune language models on your own data, fast on the hardware you have.

import strop
cfg = strop.load_config("my.yaml", ["train.max_steps=100"])
result = strop.train(cfg)          # TrainResult(run_dir, model_dir, metrics, data, seconds)
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["RunConfig", "TrainResult", "load_config", "train"]


def __getattr__(name: str):
    # Lazy so that `strop --help` and config checks don't pay for importing torch/transformers.
    if name == "train":
        from strop.recipes.run import train

        return train
    if name == "TrainResult":
        from strop.recipes.lifecycle import TrainResult

        return TrainResult
    if name in ("load_config", "RunConfig"):
        from strop.core import config

        return getattr(config, name)
    raise AttributeError(f"module 'strop' has no attribute {name!r}")
