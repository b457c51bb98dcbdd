"""Evaluation recipes: base vs tuned at the end of a run, and one model on a file (`strop eval`, the API).

The end-of-run evaluation scores data.test when the config has one, else the validation split
(which the report then flags: it was not trained on, but it chose the checkpoint that was kept).
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from strop.core.config import DatasetSource, EvalConfig, RunConfig
from strop.core.errors import DataError
from strop.data.build import read_records
from strop.data.formats import Record
from strop.data.template import ChatTemplate
from strop.eval.examples import EvalExample, eval_examples
from strop.eval.extract import get_extractor
from strop.eval.metrics import build_metrics
from strop.eval.suite import adapter_disabled, evaluate_one, metric_names, run_suite
from strop.models.load import load_model

log = logging.getLogger("strop.eval")

VALIDATION_NOTE = (
    "the validation split: never trained on, but it chose the checkpoint that was kept, so scores may "
    "be slightly optimistic; give data.test for an untouched set"
)


def check_eval_config(ev: EvalConfig) -> None:
    """Resolve the metrics and the extractor (importing custom metrics), raising ConfigError early."""
    if ev.enabled:
        build_metrics(metric_names(ev), get_extractor(ev.extract))


def evaluate_after_training(
    cfg: RunConfig,
    model,
    template: ChatTemplate,
    records: dict[str, list[Record]],
    run_dir: Path,
    progress: bool = True,
) -> dict | None:
    """Base vs tuned (and k-shot) on the run's evaluation set; None when there is none or it is off.
    `records` are the run's splits as `strop.data.build.split_records` returns them."""
    ev = cfg.eval
    if not ev.enabled:
        return None
    if records["test"]:
        set_name, note = "test", None
    elif records["validation"]:
        set_name, note = "validation", VALIDATION_NOTE
    else:
        log.info("eval: no test or validation set, so no base-vs-tuned evaluation (set data.test)")
        return None
    examples = eval_examples(records[set_name], ev.max_examples)
    if not examples:
        log.warning("eval: the %s set has no conversations ending in a reply to score", set_name)
        return None
    shots = eval_examples(records["train"]) if ev.kshot else []
    base = _base_model(cfg, model) if ev.base else None
    summary = run_suite(
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
        labels=_label_set(records, examples),
    )
    if cfg.judge is not None:
        from strop.core.io import atomic_write_json
        from strop.eval.judging import judge_samples

        summary["judge"] = judge_samples(cfg.judge, run_dir / "eval")
        atomic_write_json(run_dir / "eval" / "summary.json", summary)
    return summary


def _label_set(records: dict[str, list[Record]], examples) -> list[str] | None:
    """The training labels when every evaluation example is a labelled row with one of them (up to 50:
    constrained scoring costs one pass per label)."""
    labels = sorted({r.label for r in records["train"] if r.label is not None})
    if not 2 <= len(labels) <= 50 or not all(e.reference.strip() in labels for e in examples):
        return None
    return labels


def _base_model(cfg: RunConfig, model):
    """How to reach the base model: the adapter switched off (LoRA), else a fresh copy of the base."""
    if hasattr(model, "disable_adapter") and cfg.model.adapter != "continue":
        return lambda: adapter_disabled(model)  # (a continued adapter's start is the earlier run's model)

    @contextlib.contextmanager
    def fresh():
        device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        base = load_model(cfg.model.name, device, dtype, cfg.model.trust_remote_code)
        try:
            yield base
        finally:
            del base

    return fresh


@dataclass
class FileExamples:
    """The examples of one evaluation file, checked, each prompt carrying its passages when a retriever
    gave them (`sources`: one {id, question, sources} row per example; None without retrieval)."""

    examples: list[EvalExample]
    config: EvalConfig
    sources: list[dict] | None = None


def file_examples(
    data: str | Path,
    ev: EvalConfig,
    fmt: str = "auto",
    retriever=None,
    top_k: int = 4,
    rag_mode: str = "hybrid",
) -> FileExamples:
    """The conversations of a file that end in a reference reply, after checking the eval settings
    (metrics, extractor: custom metrics are imported here). Cheap next to loading a model, so callers
    read the file first and a typo costs no loading time."""
    check_eval_config(ev)
    records = read_records(DatasetSource(path=str(data), format=fmt))
    examples = eval_examples(records, ev.max_examples)
    if not examples:
        raise DataError(
            f"{data}: no conversations ending in a reply to score (need a prompt and a reference)"
        )
    if retriever is None:
        return FileExamples(examples, ev)
    from strop.rag.prompt import augment_examples

    examples, found = augment_examples(examples, retriever, top_k, rag_mode)
    return FileExamples(examples, ev, found)


def evaluate_on_file(
    model, template: ChatTemplate, file: FileExamples, out_dir: Path, max_length: int = 1024, progress=True
) -> dict:
    """The one way a model is scored on a file (`strop eval`, `strop.evaluate`, `LanguageModel.evaluate`):
    loss and perplexity of the references, generation metrics; writes summary.json and predictions.jsonl
    to `out_dir`, and sources.jsonl (each prompt's passages) when the examples carry them."""
    with torch.no_grad():
        summary = evaluate_one(model, template, file.examples, file.config, max_length, out_dir, progress)
    if file.sources is not None:
        from strop.core.io import atomic_write_text

        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in file.sources)
        atomic_write_text(out_dir / "sources.jsonl", lines)
    else:  # an earlier `--rag` eval's passages (replaced with --force) would describe other prompts
        (out_dir / "sources.jsonl").unlink(missing_ok=True)
    return summary
