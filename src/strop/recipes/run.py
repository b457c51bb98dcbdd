"""`strop train` for any config: sequential stages, classification, preference tuning (reward, DPO,
PPO, GRPO) or supervised fine-tuning. Every run goes through `train` here: the output folder is checked
before any work, signals stop the run at a safe point, and failures leave the run resumable or absent
(recipes/run_folder.py)."""

from __future__ import annotations

import importlib
from pathlib import Path

from strop.core.config import RunConfig, load_config
from strop.recipes.lifecycle import TrainResult
from strop.recipes.run_folder import check_output_dir, guarded
from strop.recipes.skeleton import Task, run_task


def train(
    config: RunConfig | dict | str | Path,
    overrides: list[str] | None = None,
    show_progress: bool = True,
    command: str | None = None,
) -> TrainResult | list[TrainResult]:
    """Train as the config says; a config with stages returns one result per stage. `command`: how the
    user started this run, quoted when a stopped run says how to start again."""
    if isinstance(config, RunConfig):
        config = config.model_dump(mode="json") if overrides else config
    cfg = config if isinstance(config, RunConfig) else load_config(config, overrides)
    cfg = cfg.model_copy(update={"output_dir": str(Path(cfg.output_dir).expanduser().resolve())})
    check_output_dir(cfg)
    with guarded(cfg, command or "the same command"):
        return _dispatch(cfg, show_progress)


def _dispatch(cfg: RunConfig, show_progress: bool) -> TrainResult | list[TrainResult]:
    if cfg.stages:
        from strop.recipes.stages import train_stages

        return train_stages(cfg, show_progress=show_progress)
    return run_task(task_for(cfg), cfg, show_progress)


def task_for(cfg: RunConfig) -> Task:
    """The task of a (stage-less) config; recipes are imported only when used."""
    module, name = TASKS[cfg.task]
    return getattr(importlib.import_module(f"strop.recipes.{module}"), name)()


TASKS = {  # config task -> (recipes module, Task class)
    "sft": ("sft", "SFTTask"),
    "classification": ("classify", "ClassifierTask"),
    "reward": ("preference", "RewardTask"),
    "dpo": ("preference", "PairTask"),
    "kto": ("feedback", "FeedbackTask"),
    "ppo": ("rl", "RLTask"),
    "grpo": ("rl", "RLTask"),
}
