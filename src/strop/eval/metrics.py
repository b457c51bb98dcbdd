"""Task metrics over (prediction, reference) text pairs.

A metric is either a mean of per-example scores (exact match, contains, ROUGE-L, custom functions)
or a corpus statistic (BLEU, macro-F1). Both kinds can be bootstrapped: `score(preds, refs)` on any
resample. Scores are in [0, 1] except BLEU, which keeps its usual 0-100 scale.
ROUGE-L: Lin 2004 via Google's `rouge-score`; BLEU: Papineni et al. 2002 via `sacrebleu` (Post 2018).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from strop.core.errors import ConfigError
from strop.eval.extract import Extractor

BUILTIN = ("exact_match", "contains", "rouge_l", "bleu", "accuracy", "macro_f1", "tool_call", "tool_function")


@dataclass(frozen=True)
class Metric:
    name: str
    per_example: Callable[[str, str], float] | None = None  # the score is the mean of these
    corpus: Callable[[list[str], list[str]], float] | None = None  # or a statistic of the whole set

    def score(self, preds: list[str], refs: list[str]) -> float:
        if self.corpus is not None:
            return float(self.corpus(preds, refs))
        assert self.per_example is not None, "a Metric has per_example or corpus"
        return float(np.mean([self.per_example(p, r) for p, r in zip(preds, refs, strict=True)]))


def normalize_text(text: str) -> str:
    """Case, surrounding punctuation and runs of whitespace do not count."""
    return re.sub(r"\s+", " ", text.strip().lower()).strip(" .!?;:'\"")


def _answer(text: str, extract: Extractor | None) -> str | None:
    if extract is None:
        return normalize_text(text)
    found = extract(text)
    return None if found is None else normalize_text(found)


def build_metrics(names: list[str], extract: Extractor | None) -> list[Metric]:
    """Metric objects for eval.metrics names (see BUILTIN) and `module:function` custom metrics."""
    return [_build(name, extract) for name in names]


def _build(name: str, extract: Extractor | None) -> Metric:
    def reference_answer(ref: str) -> str:
        # a reference the extractor cannot read (e.g. a bare "72") is compared as it stands
        return _answer(ref, extract) or normalize_text(ref)

    if name in ("exact_match", "accuracy"):
        return Metric(name, per_example=lambda p, r: float(_answer(p, extract) == reference_answer(r)))
    if name == "contains":
        return Metric(name, per_example=lambda p, r: float(reference_answer(r) in normalize_text(p)))
    if name in ("tool_call", "tool_function"):  # data/tools.py: the reply's calls against the reference's
        from strop.data.tools import call_accuracy, function_accuracy

        return Metric(name, per_example=call_accuracy if name == "tool_call" else function_accuracy)
    if name == "rouge_l":
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
        return Metric(name, per_example=lambda p, r: scorer.score(r, p)["rougeL"].fmeasure)
    if name == "bleu":
        import sacrebleu

        return Metric(name, corpus=lambda ps, rs: sacrebleu.corpus_bleu(ps, [rs]).score)
    if name == "macro_f1":
        return Metric(
            name,
            corpus=lambda ps, rs: macro_f1(
                [_answer(p, extract) or "" for p in ps], [reference_answer(r) for r in rs]
            ),
        )
    if ":" in name:
        return Metric(name, per_example=_import_metric(name))
    raise ConfigError(
        f"eval.metrics: unknown metric {name!r}; choose from {', '.join(BUILTIN)} or module:function"
    )


def macro_f1(preds: list[str], refs: list[str]) -> float:
    """Mean over the reference labels of each label's F1 (a label never predicted nor present: skipped)."""
    scores = []
    for label in sorted(set(refs)):
        tp = sum(p == label and r == label for p, r in zip(preds, refs, strict=True))
        fp = sum(p == label and r != label for p, r in zip(preds, refs, strict=True))
        fn = sum(p != label and r == label for p, r in zip(preds, refs, strict=True))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return float(np.mean(scores)) if scores else 0.0


def _import_metric(spec: str) -> Callable[[str, str], float]:
    """`package.module:function`, called as function(prediction, reference) -> float per example."""
    module_name, _, attr = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"eval.metrics: cannot import {spec!r}: {e}") from None
    if not callable(fn):
        raise ConfigError(f"eval.metrics: {spec!r} is not a function")

    def call(pred: str, ref: str) -> float:
        value = fn(pred, ref)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            value = float(value)  # bools and numpy scalars are fine; anything else fails here
        return float(value)

    return call
