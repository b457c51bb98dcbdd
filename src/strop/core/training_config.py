"""The method, optimizer and training-loop sections of a run config (`method`, `optim`, `train`):
which weights train and how (LoRA and its PEFT variants, freeze, full), the optimizer and schedule,
and the loop's batches, steps, checkpoints, precision, memory limit and trackers."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from strop.core.section import Section
from strop.core.sizes import parse_bytes


class LoraConfig(Section):
    r: int = Field(16, ge=1)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)  # as peft, LLaMA-Factory, Unsloth; >0 costs ~14% per CPU step
    target_modules: str | list[str] = "all-linear"
    use_dora: bool = Field(
        False, description="DoRA: a learned magnitude per output beside the low-rank direction (PEFT)"
    )
    use_rslora: bool = Field(False, description="rsLoRA: scale alpha / sqrt(r) instead of alpha / r")
    init: Literal["default", "gaussian", "pissa", "olora"] = Field(
        "default",
        description="the adapter's start: default (A random, B zero), gaussian, pissa (the weights' top "
        "singular vectors) or olora (a QR of the weights); pissa and olora move part of the base weights "
        "into the adapter, and the saved adapter is converted back to plain LoRA over the original base",
    )
    lr_ratio: float | None = Field(
        None, gt=0, description="LoRA+: the B matrices learn at lr x lr_ratio (the paper suggests 16)"
    )

    @model_validator(mode="after")
    def _peft_can_do_it(self) -> LoraConfig:
        if self.use_dora and self.init in ("pissa", "olora"):
            raise ValueError(
                f"init: {self.init} with use_dora: the saved adapter of a {self.init} start is converted to "
                "plain LoRA over the original weights, which PEFT cannot do for DoRA's magnitudes"
            )
        return self


class FreezeConfig(Section):
    train_last_n_blocks: int = Field(2, ge=0)
    train_patterns: list[str] = Field(default_factory=list, description="regexes of parameter names to train")
    train_lm_head: bool = False


class MethodConfig(Section):
    name: Literal["full", "freeze", "lora", "head"] = Field(
        "lora", description="head: classification only, the backbone frozen (feature-based)"
    )
    lora: LoraConfig = Field(default_factory=LoraConfig)
    freeze: FreezeConfig = Field(default_factory=FreezeConfig)


class OptimConfig(Section):
    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = Field(0.9, ge=0, description="SGD only")
    schedule: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _betas_need_adam(self) -> OptimConfig:
        if self.name == "sgd" and "betas" in self.model_fields_set:
            raise ValueError(
                "betas are only used by adam/adamw; remove optim.betas or choose optim.name: adamw"
            )
        return self


class EarlyStopping(Section):
    patience: int | None = Field(None, ge=1, description="evaluations without improvement before stopping")
    min_delta: float = Field(0.0, ge=0)


class TrainConfig(Section):
    batch_size: int = Field(4, ge=1, description="examples per micro-batch (padded to the longest)")
    batch_tokens: int | None = Field(
        None,
        ge=16,
        description="instead of batch_size: pack examples into one row of up to N tokens, padding-free",
    )
    grad_accum: int = Field(1, ge=1)
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] | None = Field(
        None,
        description="experiment trackers, each given the config, every step's numbers, the evaluation and "
        "the report (default: TensorBoard when it is installed); MLflow writes to $MLFLOW_TRACKING_URI "
        "or the run folder's mlruns/, W&B runs offline unless $WANDB_MODE says otherwise",
    )
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; overrides epochs")
    seed: int = 42
    eval_every: int | None = Field(None, ge=1, description="steps between validations (also at the end)")
    save_every: int | None = Field(None, ge=1, description="steps between checkpoints (also at the end)")
    keep_last: int = Field(2, ge=1)
    log_every: int = Field(1, ge=1)
    early_stopping: EarlyStopping = Field(default_factory=EarlyStopping)
    max_bad_steps: int = Field(3, ge=1, description="consecutive NaN/inf losses before the run stops")
    threads: int | None = Field(None, ge=1, description="CPU threads; default all physical cores")
    gradient_checkpointing: bool = Field(
        False,
        description="recompute each block's activations in backward: far less memory, ~1.3-1.5x the time",
    )
    memory_limit: str | None = Field(
        None,
        description="keep the peak under this (12GB, 16GiB, or auto: what the machine has free): the "
        "micro-batch is lowered and accumulation raised at the same global batch, from a measured probe "
        "(training/memory.py; the choice is in memory.json)",
    )
    release_memory: bool = Field(
        False,
        description="CPU: hand freed memory back to the OS after every micro-batch (lower resident memory "
        "between steps; each step then page-faults its activations in again, which costs time)",
    )
    parallel: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="several processes (--nproc, torchrun): ddp keeps the whole model in each; fsdp shards "
        "the transformer blocks' weights, gradients and optimizer state over them (torch FSDP2)",
    )

    @field_validator("memory_limit", mode="before")
    @classmethod
    def _size(cls, value: Any) -> Any:
        if value is not None:
            parse_bytes(value)  # a ValueError names the field
            return str(value)
        return value

    @property
    def memory_limit_bytes(self) -> int | None:
        """The limit in bytes; None for no limit or `auto` (what the machine has free)."""
        return parse_bytes(self.memory_limit) if self.memory_limit is not None else None

    @model_validator(mode="after")
    def _limit_needs_padded_batches(self) -> TrainConfig:
        if self.memory_limit is not None and self.batch_tokens is not None:
            raise ValueError(
                "memory_limit: packed rows (batch_tokens) are sized by their token budget; lower "
                "train.batch_tokens instead"
            )
        return self
