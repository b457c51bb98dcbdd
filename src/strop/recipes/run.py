"""`strop train` for any config: sequential stages, classification, preference tuning (reward, DPO,
PPO, GRPO) or supervised fine-tuning."""

from __future__ import annotations

from pathlib import Path

from strop.core.config import RunConfig, load_config
from strop.recipes.sft import TrainResult


def train(
    config: RunConfig | dict | str | Path, overrides: list[str] | None = None, show_progress: bool = True
) -> TrainResult | list[TrainResult]:
    """Train as the config says; a config with stages returns one result per stage."""
    if isinstance(config, RunConfig):
        config = config.model_dump(mode="json") if overrides else config
    cfg = config if isinstance(config, RunConfig) else load_config(config, overrides)
    if cfg.stages:
        from strop.recipes.stages import train_stages

        return train_stages(cfg, show_progress=show_progress)
    if cfg.task in ("reward", "dpo"):
        from strop.recipes.preference import train_preference

        return train_preference(cfg, show_progress=show_progress)
    if cfg.task in ("ppo", "grpo"):
        from strop.recipes.rl import train_rl

        return train_rl(cfg, show_progress=show_progress)
    if cfg.task == "classification":
        from strop.recipes.classify import train_classifier

        return train_classifier(cfg, show_progress=show_progress)
    from strop.recipes import sft

    return sft.train(cfg, show_progress=show_progress)
