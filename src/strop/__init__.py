"""strop: fine-tune language models on your own data, fast on the hardware you have.

import strop
cfg = strop.load_config("my.yaml", ["train.max_steps=100"])
result = strop.train(cfg)          # TrainResult(run_dir, model_dir, metrics, data, seconds, eval, report)
lm = strop.load(result.run_dir)    # what the run can do: generate/chat/evaluate/merge, predict, score
lm.generate(["Write a haiku."])
report = strop.check_data(cfg)     # the data doctor's findings, as `strop data check` prints them
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["RunConfig", "TrainResult", "check_data", "evaluate", "load", "load_config", "train"]


def __getattr__(name: str):
    # Lazy so that `strop --help` and config checks don't pay for importing torch/transformers.
    if name == "train":
        from strop.recipes.run import train

        return train
    if name in ("load", "evaluate", "check_data"):
        from strop import api

        return getattr(api, name)
    if name == "TrainResult":
        from strop.recipes.lifecycle import TrainResult

        return TrainResult
    if name in ("load_config", "RunConfig"):
        from strop.core import config

        return getattr(config, name)
    raise AttributeError(f"module 'strop' has no attribute {name!r}")
