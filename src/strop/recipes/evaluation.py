"""Evaluation recipes: base vs tuned at the end of a run, and `strop eval` for any model.

The end-of-run evaluation scores data.test when the config has one, else the validation split
(which the report then flags: it was not trained on, but it chose the checkpoint that was kept).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch

from strop.core.config import DatasetSource, EvalConfig, RunConfig
from strop.core.errors import DataError
from strop.data.build import Datasets, read_records
from strop.data.template import ChatTemplate
from strop.eval.examples import EvalExample, eval_examples
from strop.eval.suite import adapter_disabled, evaluate_one, run_suite
from strop.models.inference import load_for_inference
from strop.models.load import load_causal_lm, resolve_source

log = logging.getLogger("strop.eval")

VALIDATION_NOTE = (
    "the validation split: never trained on, but it chose the checkpoint that was kept, so scores may "
    "be slightly optimistic; give data.test for an untouched set"
)


def evaluate_after_training(
    cfg: RunConfig, model, template: ChatTemplate, data: Datasets, run_dir: Path, progress: bool = True
) -> dict | None:
    """Base vs tuned (and k-shot) on the run's evaluation set; None when there is none or it is off."""
    ev = cfg.eval
    if not ev.enabled:
        return None
    if cfg.data.test:
        records, set_name, note = _records(cfg.data.test), "test", None
    elif data.validation is not None and len(data.validation):
        wanted = set(data.validation.example_ids)
        records = [r for r in _records(cfg.data.validation or cfg.data.train) if r.id in wanted]
        set_name, note = "validation", VALIDATION_NOTE
    else:
        log.info("eval: no test or validation set, so no base-vs-tuned evaluation (set data.test)")
        return None
    examples = eval_examples(records, ev.max_examples)
    if not examples:
        log.warning("eval: the %s set has no conversations ending in a reply to score", set_name)
        return None
    shots: list[EvalExample] = []
    if ev.kshot:
        trained = set(data.train.example_ids)
        shots = eval_examples([r for r in _records(cfg.data.train) if r.id in trained])
    base = _base_model(cfg, model) if ev.base else None
    return run_suite(
        model,
        base,
        template,
        examples,
        shots,
        ev,
        cfg.data.max_length,
        run_dir / "eval",
        set_name,
        note,
        cfg.train.seed,
        progress,
    )


def _records(sources: list[DatasetSource]) -> list:
    return [r for s in sources for r in read_records(s)]


def _base_model(cfg: RunConfig, model):
    """How to reach the base model: the adapter switched off (LoRA), else a fresh copy of the base."""
    if hasattr(model, "disable_adapter"):
        return lambda: adapter_disabled(model)

    @contextlib.contextmanager
    def fresh():
        device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        base = load_causal_lm(resolve_source(cfg.model.name), device, dtype, cfg.model.trust_remote_code)
        try:
            yield base
        finally:
            del base

    return fresh


def evaluate_model_on_file(
    target: str,
    data: str,
    ev: EvalConfig,
    out_dir: Path,
    max_length: int = 1024,
    fmt: str = "auto",
    device: str = "auto",
    progress: bool = True,
) -> dict:
    """`strop eval TARGET --data FILE`: one model (a run, a model folder or a catalogue name)."""
    loaded = load_for_inference(target, device)
    records = read_records(DatasetSource(path=data, format=fmt))
    examples = eval_examples(records, ev.max_examples)
    if not examples:
        raise DataError(
            f"{data}: no conversations ending in a reply to score (need a prompt and a reference)"
        )
    with torch.no_grad():
        return evaluate_one(loaded.model, loaded.template, examples, ev, max_length, out_dir, progress)
