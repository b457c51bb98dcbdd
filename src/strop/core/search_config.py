"""The `search:` section of a run config: what `strop tune` varies and how it chooses.

The section is strop tune's alone: `strop train` trains the config as written (the "default config" a
search is measured against). The space itself is parsed and checked against the run config by
`strop.tune.space`, so its errors can name `search.space.<key>`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from strop.core.section import Section


class SearchConfig(Section):
    space: dict[str, Any] = Field(
        default_factory=dict,
        description="dotted config key -> {low, high[, log][, step]} (an integer range when low and high "
        "are integers) or a list of choices, e.g. optim.lr: {low: 1e-5, high: 1e-3, log: true}",
    )
    trials: int = Field(12, ge=1, description="finished trials (complete or pruned) the study should hold")
    objective: str = Field(
        "val_loss",
        description="val_loss (the default), any val_* metric the run's validation logs (val_accuracy, "
        "val_macro_f1, ...) at its best step, or a metric of its end-of-run evaluation (exact_match, "
        "rouge_l, accuracy, macro_f1, ...), which trials compute on the validation set",
    )
    direction: Literal["minimize", "maximize"] | None = Field(
        None, description="default: minimize for losses and perplexities, maximize otherwise"
    )
    sampler: Literal["tpe", "random", "grid"] = "tpe"
    pruner: Literal["median", "hyperband", "none"] = Field(
        "median", description="stop poor trials early on the validation loss logged every train.eval_every"
    )
    startup_trials: int = Field(
        3, ge=0, description="median pruner: finished trials before any trial is pruned"
    )
    warmup_steps: int = Field(
        0, ge=0, description="median pruner: steps a trial runs before it can be pruned"
    )
    seed: int = Field(0, description="the sampler's seed")
    workers: int = Field(1, ge=1, description="trials run in parallel by this process")
    storage: str | None = Field(
        None,
        description="where the study lives: an SQLAlchemy URL (sqlite:///PATH, postgresql://...) or "
        "journal:PATH (a file several processes append to); default sqlite in the run folder",
    )
    keep_checkpoints: bool = Field(
        False, description="keep each trial's checkpoints (by default only its exported model is kept)"
    )


def default_direction(objective: str) -> Literal["minimize", "maximize"]:
    return "minimize" if "loss" in objective or "ppl" in objective else "maximize"
