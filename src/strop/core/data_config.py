"""The `data:` section of a run config: sources, splits, mixtures, curriculum and augmentation.
(Re-exported by `strop.core.config`, which holds the rest of the run config.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from strop.core.section import Section

MAX_ROW_BYTES = 8 << 20  # far above real rows (a whole novel is ~1 MB), far below what hurts a machine


class DatasetSource(Section):
    path: str = Field(description="JSONL/JSON/CSV/Parquet file, a folder of them, or a HF dataset name")
    format: Literal[
        "auto",
        "alpaca",
        "messages",
        "tools",
        "sharegpt",
        "prompt_completion",
        "question_answer",
        "labelled",
        "preference",
        "feedback",
        "text",
    ] = "auto"
    fields: dict[str, str] = Field(default_factory=dict, description="map strop's field names to yours")
    split: str = "train"
    skip: int = Field(0, ge=0, description="leave out the first N rows (e.g. those another split uses)")
    limit: int | None = Field(None, ge=1, description="use only the first N rows (after skip)")
    name: str | None = Field(None, description="what reports call this source (default: the file name)")
    ratio: float | None = Field(
        None, gt=0, description="share of the training mixture (relative to the other sources' ratios)"
    )
    template: str | None = Field(None, description="this source's own chat template (default: data.template)")

    @property
    def label(self) -> str:
        return self.name or Path(self.path).stem


class MixtureConfig(Section):
    examples: int | None = Field(
        None,
        ge=1,
        description="training examples per epoch; default: as many as the ratios allow without repeats",
    )
    replacement: bool = Field(
        False, description="sample with replacement (lets a small source be repeated to meet its ratio)"
    )


class CurriculumConfig(Section):
    difficulty: Literal["length", "loss"] = Field(
        "length",
        description="token count, or the base model's loss on the example (one pass before training)",
    )
    start: float = Field(0.2, gt=0, le=1, description="fraction of easiest examples sampled at step 0")
    full_at: float = Field(
        0.5,
        gt=0,
        description="step at which all data is in play: a fraction (<= 1) of the run or a step number",
    )
    pacing: Literal["linear", "root"] = "root"


class AugmentConfig(Section):
    copies: int = Field(1, ge=1, description="augmented copies per training example")
    paraphrase: bool = Field(True, description="reword the instruction's framing (never the response)")
    char_noise: float = Field(0.0, ge=0, le=0.5, description="per-character drop/swap rate in user turns")
    word_noise: float = Field(0.0, ge=0, le=0.5, description="per-word drop/swap rate in user turns")


class DataConfig(Section):
    train: list[DatasetSource] = Field(
        default_factory=list, description="at least one source (in each stage, when stages are used)"
    )
    validation: list[DatasetSource] = Field(default_factory=list)
    test: list[DatasetSource] = Field(
        default_factory=list, description="never trained on nor used to pick a checkpoint: what eval scores"
    )
    val_fraction: float = Field(
        0.1, ge=0.0, lt=1.0, description="held out when no validation files are given"
    )
    template: str = Field(
        "auto", description="'auto' (tokenizer's own), 'chatml', 'alpaca', or a Jinja string"
    )
    system_prompt: str | None = None
    max_length: int = Field(512, ge=8)
    max_row_bytes: int = Field(
        MAX_ROW_BYTES,
        ge=1024,
        description="largest row read (a JSONL line, in bytes); a larger one is rejected by file:line",
    )
    train_on_prompt: bool = False
    cache_dir: str | None = Field(None, description="tokenized-data cache; default ~/.cache/strop/tokenized")
    skip_bad_rows: bool = Field(
        False, description="leave malformed rows out (counted in the data summary) instead of stopping"
    )
    allow_leakage: bool = Field(
        False,
        description="train even when validation/test examples copy training ones (reported, not refused)",
    )
    mixture: MixtureConfig | None = Field(None, description="sample training sources by their `ratio`")
    curriculum: CurriculumConfig | None = Field(None, description="easy-to-hard order; default: shuffled")
    augment: AugmentConfig | None = Field(None, description="augmented copies of training examples")

    @field_validator("train", "validation", "test", mode="before")
    @classmethod
    def _paths_as_sources(cls, v: Any) -> Any:
        if isinstance(v, (str, dict)):
            v = [v]
        return [{"path": x} if isinstance(x, str) else x for x in v]

    @model_validator(mode="after")
    def _ratios_on_every_source(self) -> DataConfig:
        given = [s.ratio is not None for s in self.train]
        if any(given) and not all(given):
            raise ValueError("data.train: give a ratio to every training source, or to none")
        if self.mixture is not None and not any(given):
            raise ValueError("data.mixture needs a ratio on each data.train source")
        labels = [s.label for s in self.train]
        if any(given) and len(set(labels)) < len(labels):
            raise ValueError(f"data.train: two sources share the name {labels}; set `name` on each")
        return self
