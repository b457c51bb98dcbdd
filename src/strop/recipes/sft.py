"""Supervised fine-tuning recipe (full, freeze or LoRA): the composition behind `strop train`.

Run directory:
    config.yaml  data_summary.json  metrics.jsonl  result.json
    checkpoints/step-NNNNNN/        (resume state, see training/checkpoint.py)
    model/                          adapter (PEFT format) or full model, tokenizer, strop_model.json
    eval/summary.json samples.jsonl base vs tuned on the test (else validation) set (recipes/evaluation.py)
    report.html report.md report.json   the run report (strop.report)
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from strop.core.config import RunConfig, load_config
from strop.core.errors import ConfigError, StropError
from strop.core.progress import tqdm
from strop.data.build import add_replay, build_datasets, split_records
from strop.data.curriculum import difficulty_by_length
from strop.data.leakage import guard_leakage
from strop.data.template import run_templates
from strop.data.tokenized import TokenizedSet
from strop.export.save import export_model
from strop.methods import distill, sft
from strop.models.attention import enable_segment_attention
from strop.models.load import check_same_tokenizer, load_model, load_tokenizer, tokenizer_source
from strop.recipes.evaluation import check_eval_config, evaluate_after_training
from strop.recipes.lifecycle import TrainResult
from strop.recipes.skeleton import Run, Task, run_task
from strop.training.loop import Curriculum

log = logging.getLogger("strop")


def train(
    config: RunConfig | dict | str | Path,
    overrides: list[str] | None = None,
    show_progress: bool = True,
    earlier: list[RunConfig] | None = None,
    replay: float = 0.0,
) -> TrainResult:
    """Fine-tune as `config` says; resumes automatically when the run directory holds a checkpoint.

    `earlier`: the configs of earlier stages (sequential fine-tuning, see recipes/stages.py): their
    validation sets are watched for forgetting, and `replay` of this run's training examples are theirs.
    """
    if isinstance(config, RunConfig):
        config = config.model_dump(mode="json") if overrides else config
    cfg = config if isinstance(config, RunConfig) else load_config(config, overrides)
    if cfg.stages or cfg.task != "sft":
        raise StropError(
            "train this config with strop.train (strop.recipes.run.train), which picks the recipe"
        )
    return run_task(SFTTask(earlier, replay), cfg, show_progress)


class SFTTask(Task):
    """Supervised fine-tuning, optionally distilled from a teacher, on the chat template's rendering."""

    def __init__(self, earlier: list[RunConfig] | None = None, replay: float = 0.0):
        self.earlier, self.replay = earlier or [], replay
        self.monitors: dict[str, TokenizedSet] = {}

    def data(self, run: Run) -> dict:
        cfg, tokenizer = run.cfg, run.tokenizer
        check_eval_config(cfg.eval)  # a misspelt metric fails now, not after the training it would score
        if cfg.judge is not None:
            from strop.eval.judging import check_judge

            check_judge(cfg.judge)
        self.template_name, self.template, own = run_templates(cfg, tokenizer)
        data = build_datasets(cfg.data, self.template, cfg.train.seed, own, progress=run.show_progress)
        if self.earlier:
            before = [_stage_data(e, tokenizer) for e in self.earlier]
            if self.replay:
                names = [e.name for e in self.earlier]
                data = add_replay(data, [b.train for b in before], names, self.replay, cfg.train.seed)
            self.monitors = {
                f"stage:{e.name}": b.validation
                for e, b in zip(self.earlier, before, strict=True)
                if b.validation
            }
        data.summary["template"] = self.template_name
        self.records = split_records(cfg.data, data)
        data.summary["leakage"] = guard_leakage(cfg.data, data, self.records)
        log.info(
            "data: %d train / %d validation examples, %d label tokens (template %s)",
            data.summary["train_examples"],
            data.summary["validation_examples"],
            data.summary["train_label_tokens"],
            self.template_name,
        )
        self.train_set, self.validation, self.groups = data.train, data.validation, data.validation_groups
        return data.summary

    def objective(self, run: Run, model) -> sft.SFT:
        cfg = run.cfg
        if cfg.train.batch_tokens:
            attention = enable_segment_attention(model)
            log.info("packing: rows of up to %d tokens, attention %s", cfg.train.batch_tokens, attention)
        if not cfg.distill:
            return sft.SFT()
        teacher = _teacher(cfg, model, run.tokenizer, run.device, torch.float32 if run.amp else run.dtype)
        if cfg.distill.cache_top_k:
            self.train_set.teacher = _cache_teacher(cfg, teacher, self.train_set, run)
            teacher = None  # the cache replaces it; its memory goes back before training
        return distill.LMDistill(teacher, cfg.distill.temperature, cfg.distill.alpha)

    def fit_options(self, run: Run, model) -> dict:
        curriculum = _curriculum(run.cfg, model, self.train_set, run.pad_id, run.device, run.show_progress)
        return {"curriculum": curriculum, "val_groups": self.groups, "monitors": self.monitors}

    def export(self, run: Run, model) -> Path:
        return export_model(
            run.run_dir / "model", model, run.tokenizer, self.template, run.cfg, self.template_name
        )

    def evaluate(self, run: Run, model) -> dict | None:
        t_eval = time.time()
        cfg = run.cfg
        evaluation = evaluate_after_training(
            cfg, model, self.template, self.records, run.run_dir, run.show_progress
        )
        if evaluation is not None:
            log.info("eval: %s in %.0f s", _headline(evaluation), time.time() - t_eval)
        return evaluation


def _cache_teacher(cfg: RunConfig, teacher, train_set, run: Run) -> list:
    """The teacher's top-k logits per label token of every training example, computed once."""
    assert cfg.distill is not None and cfg.distill.cache_top_k is not None  # called for cache_top_k only
    t_cache = time.time()
    with tqdm(total=len(train_set), desc="teacher top-k", disable=not run.show_progress) as bar:
        cached = distill.teacher_top_k(
            teacher, train_set, run.pad_id, cfg.distill.cache_top_k, cfg.train.batch_size, run.device, bar
        )
    log.info(
        "teacher: top-%d logits of %d examples cached in %.1f s",
        cfg.distill.cache_top_k,
        len(train_set),
        time.time() - t_cache,
    )
    return cached


def _teacher(cfg: RunConfig, student, tokenizer, device, dtype):
    """The frozen teacher: any model source or strop run, with the student's tokenizer and vocabulary."""
    assert cfg.distill is not None  # called for distill runs only
    teacher_tok = load_tokenizer(tokenizer_source(cfg.distill.teacher), cfg.model.trust_remote_code)
    check_same_tokenizer(teacher_tok, tokenizer)
    teacher = load_model(cfg.distill.teacher, device, dtype, cfg.model.trust_remote_code).eval()
    t, s = teacher.get_output_embeddings().weight.shape[0], student.get_output_embeddings().weight.shape[0]
    if t != s:
        raise ConfigError(
            f"distill.teacher: its output vocabulary has {t} rows, the student's {s}; they must match"
        )
    log.info(
        "distilling from %s (T=%g, alpha=%g)", cfg.distill.teacher, cfg.distill.temperature, cfg.distill.alpha
    )
    return teacher.requires_grad_(False)


def _stage_data(cfg: RunConfig, tokenizer):
    """An earlier stage's train and validation sets, built as that stage built them."""
    _, template, own = run_templates(cfg, tokenizer)
    return build_datasets(cfg.data, template, cfg.train.seed, own)


def _curriculum(
    cfg: RunConfig, model, train_set, pad_id: int, device, show_progress: bool
) -> Curriculum | None:
    c = cfg.data.curriculum
    if c is None:
        return None
    if c.difficulty == "length":
        difficulty = difficulty_by_length(train_set)
    else:
        with tqdm(total=len(train_set), desc="curriculum: base-model loss", disable=not show_progress) as bar:
            difficulty = np.asarray(sft.example_losses(model, train_set, pad_id, device, bar))
    log.info(
        "curriculum: by %s, starting with the easiest %.0f%% (%s pacing)",
        c.difficulty,
        100 * c.start,
        c.pacing,
    )
    return Curriculum(difficulty, c.start, c.full_at, c.pacing)


def _headline(summary: dict) -> str:
    parts = []
    for name, row in summary["metrics"].items():
        if "base" in row:
            lo, hi = row["ci95"]
            parts.append(
                f"{name} base {row['base']:.3f} -> tuned {row['tuned']:.3f} (95% CI of the gain {lo:+.3f} to {hi:+.3f})"
            )
        else:
            parts.append(f"{name} {row['tuned']:.3f}")
    return "; ".join(parts) + f" on {summary['examples']} {summary['set']} examples"
