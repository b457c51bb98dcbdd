"""Base vs tuned (vs k-shot) on one evaluation set, with confidence intervals and a forgetting check.

Writes `summary.json` (what the run report shows) and `samples.jsonl` (every example: prompt,
reference, each model's reply and scores) into the given folder. `evaluate_one` is the single-model
form behind `strop eval`.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any

from strop.core.config import EvalConfig
from strop.core.io import atomic_write_json, atomic_write_text
from strop.data.template import ChatTemplate
from strop.eval.bootstrap import paired_bootstrap
from strop.eval.examples import EvalExample, pick_shots, with_shots
from strop.eval.extract import get_extractor
from strop.eval.label_scoring import label_logprobs
from strop.eval.metrics import Metric, build_metrics
from strop.eval.model_eval import GenerationSettings, ModelResult, evaluate_model, text_loss

log = logging.getLogger("strop.eval")

BaseModel = Callable[[], contextlib.AbstractContextManager]  # yields the base model while open


def metric_names(cfg: EvalConfig) -> list[str]:
    return cfg.metrics or (["exact_match"] if cfg.extract else ["rouge_l", "bleu"])


def settings(cfg: EvalConfig) -> GenerationSettings:
    return GenerationSettings(cfg.max_new_tokens, cfg.temperature, cfg.top_p, list(cfg.stop), cfg.batch_size)


def reference_text(path: str | None) -> tuple[str, str]:
    """(text, name): the user's file, or the general text shipped with strop."""
    if path:
        return Path(path).expanduser().read_text(encoding="utf-8"), path
    shipped = resources.files("strop.eval") / "data" / "general_reference.txt"
    return shipped.read_text(encoding="utf-8"), "strop's general reference text (13 topics, ~2,600 words)"


def prompt_text(example: EvalExample) -> str:
    """The example's input as a person would read it: its user turns."""
    return "\n\n".join(m["content"] for m in example.prompt if m["role"] == "user")


def run_suite(
    tuned,
    base: BaseModel | None,
    template: ChatTemplate,
    examples: list[EvalExample],
    shot_pool: list[EvalExample],
    cfg: EvalConfig,
    max_length: int,
    out_dir: Path,
    set_name: str,
    set_note: str | None = None,
    seed: int = 0,
    progress: bool = True,
    labels: list[str] | None = None,
) -> dict:
    """Evaluate the tuned model (and, when `base` is given, the base model, plainly and k-shot) on the
    same examples; return and write the summary. `labels`: the label set of labelled data, which adds
    `label_accuracy` by constrained label likelihood (eval/label_scoring.py) as the first metric."""
    metrics = build_metrics(metric_names(cfg), get_extractor(cfg.extract))
    gen = settings(cfg)
    plain = [list(e.prompt) for e in examples]
    results: dict[str, ModelResult] = {}
    forgetting_loss: dict[str, float | None] = {}
    text, text_name = reference_text(cfg.reference_text) if cfg.forgetting else ("", "")

    log.info("eval: tuned model on %d %s examples", len(examples), set_name)
    results["tuned"] = evaluate_model(tuned, template, examples, plain, metrics, gen, max_length, progress)
    chosen: dict[str, list[str]] = {}
    if labels:
        chosen["tuned"] = choose_labels(tuned, template, plain, labels, cfg.batch_size)
    if cfg.forgetting:
        forgetting_loss["tuned"] = text_loss(tuned, template, text, max_length, cfg.batch_size)
    shots = pick_shots(shot_pool, cfg.kshot, seed) if cfg.kshot else []
    if base is not None:
        with base() as model:
            log.info("eval: base model on the same examples")
            results["base"] = evaluate_model(
                model, template, examples, plain, metrics, gen, max_length, progress
            )
            if labels:
                chosen["base"] = choose_labels(model, template, plain, labels, cfg.batch_size)
            if shots:
                log.info("eval: base model with %d examples in the prompt (%d-shot)", len(shots), len(shots))
                prompted = [with_shots(e, shots) for e in examples]
                results["kshot"] = evaluate_model(
                    model, template, examples, prompted, metrics, gen, max_length, progress, with_loss=False
                )
                if labels:
                    chosen["kshot"] = choose_labels(model, template, prompted, labels, cfg.batch_size)
            if cfg.forgetting:
                forgetting_loss["base"] = text_loss(model, template, text, max_length, cfg.batch_size)

    summary = _summary(results, metrics, examples, cfg, set_name, set_note, len(shots))
    if chosen:
        summary["metrics"] = {"label_accuracy": _label_row(chosen, examples, cfg), **summary["metrics"]}
        summary["labels"] = labels
        summary["primary_metric"] = "label_accuracy"  # what the headline reports (JSON keys get sorted)
        summary["label_predictions"] = chosen
    base_loss, tuned_loss = forgetting_loss.get("base"), forgetting_loss.get("tuned")
    if base_loss is not None and tuned_loss is not None:
        summary["forgetting"] = _forgetting(base_loss, tuned_loss, cfg, text_name)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "summary.json", summary)
    atomic_write_text(out_dir / "samples.jsonl", _samples(examples, results))
    return summary


LABEL_ACCURACY = Metric("label_accuracy", per_example=lambda pred, ref: float(pred == ref))


def choose_labels(
    model, template: ChatTemplate, prompts: list[list[dict]], labels: list[str], batch: int
) -> list[str]:
    """The label each prompt's reply most probably is (no generation, no parsing)."""
    scores = label_logprobs(model, template, prompts, labels, batch)
    return [labels[j] for j in scores.argmax(-1).tolist()]


def _label_row(chosen: dict[str, list[str]], examples: list[EvalExample], cfg: EvalConfig) -> dict:
    refs = [e.reference.strip() for e in examples]
    row: dict = {name: LABEL_ACCURACY.score(picks, refs) for name, picks in chosen.items()}
    for other, prefix in (("base", ""), ("kshot", "kshot_")):
        if other in chosen:
            ci = paired_bootstrap(LABEL_ACCURACY, refs, chosen[other], chosen["tuned"], cfg.bootstrap)
            row[f"{prefix}diff"], row[f"{prefix}ci95"] = ci["diff"], ci["ci"]
    row["ci_level"] = 0.95
    return row


def _summary(
    results: dict[str, ModelResult],
    metrics: list[Metric],
    examples: list[EvalExample],
    cfg: EvalConfig,
    set_name: str,
    set_note: str | None,
    k: int,
) -> dict:
    refs = [e.reference for e in examples]
    table: dict[str, dict] = {}
    for m in metrics:
        row: dict = {name: r.scores[m.name] for name, r in results.items()}
        for other, prefix in (("base", ""), ("kshot", "kshot_")):
            if other in results:
                ci = paired_bootstrap(
                    m, refs, results[other].predictions, results["tuned"].predictions, cfg.bootstrap
                )
                row[f"{prefix}diff"], row[f"{prefix}ci95"] = ci["diff"], ci["ci"]
        row["ci_level"] = 0.95
        table[m.name] = row
    return {
        "set": set_name,
        "set_note": set_note,
        "examples": len(examples),
        "models": list(results),
        "kshot": k or None,
        "likelihood": {
            name: {"loss": r.loss, "ppl": r.ppl} for name, r in results.items() if r.loss is not None
        },
        "metrics": table,
        "throughput": {
            name: {"seconds": r.seconds, "examples_per_s": len(examples) / max(r.seconds, 1e-9)}
            for name, r in results.items()
        },
        "generation": {
            "max_new_tokens": cfg.max_new_tokens,
            "temperature": cfg.temperature,
            "top_p": cfg.top_p,
            "stop": list(cfg.stop),
            "extract": cfg.extract,
        },
    }


def _forgetting(base_loss: float, tuned_loss: float, cfg: EvalConfig, name: str) -> dict:
    import math

    base_ppl, tuned_ppl = math.exp(base_loss), math.exp(tuned_loss)
    change = tuned_ppl / base_ppl - 1
    if change > cfg.forgetting_threshold:
        log.warning(
            "forgetting: perplexity on general text rose %.1f%% (%.2f -> %.2f), above eval.forgetting_threshold %.0f%%",
            100 * change,
            base_ppl,
            tuned_ppl,
            100 * cfg.forgetting_threshold,
        )
    return {
        "reference": name,
        "base_ppl": base_ppl,
        "tuned_ppl": tuned_ppl,
        "relative_change": change,
        "threshold": cfg.forgetting_threshold,
        "warning": change > cfg.forgetting_threshold,
    }


def _samples(examples: list[EvalExample], results: dict[str, ModelResult]) -> str:
    lines = []
    for i, e in enumerate(examples):
        row: dict[str, Any] = {"id": e.id, "input": prompt_text(e), "reference": e.reference}
        row.update({name: r.predictions[i] for name, r in results.items()})
        row["scores"] = {name: {m: v[i] for m, v in r.per_example.items()} for name, r in results.items()}
        lines.append(json.dumps(row, ensure_ascii=False))
    return "\n".join(lines) + "\n" if lines else ""


def evaluate_one(
    model,
    template: ChatTemplate,
    examples: list[EvalExample],
    cfg: EvalConfig,
    max_length: int,
    out_dir: Path,
    progress: bool = True,
) -> dict:
    """`strop eval`: one model; writes summary.json and predictions.jsonl into out_dir."""
    metrics = build_metrics(metric_names(cfg), get_extractor(cfg.extract))
    r = evaluate_model(
        model,
        template,
        examples,
        [list(e.prompt) for e in examples],
        metrics,
        settings(cfg),
        max_length,
        progress,
    )
    summary = {
        "examples": len(examples),
        "loss": r.loss,
        "ppl": r.ppl,
        "metrics": r.scores,
        "seconds": r.seconds,
        "examples_per_s": len(examples) / max(r.seconds, 1e-9),
    }
    rows = []
    for i, e in enumerate(examples):
        scores = {m: v[i] for m, v in r.per_example.items()}
        rows.append(
            {
                "id": e.id,
                "input": prompt_text(e),
                "reference": e.reference,
                "prediction": r.predictions[i],
                "scores": scores,
            }
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "summary.json", summary)
    atomic_write_text(
        out_dir / "predictions.jsonl", "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in rows)
    )
    return summary


@contextlib.contextmanager
def adapter_disabled(model) -> Iterator:
    """The base model of a peft model: the same weights with the adapter off (no second copy)."""
    with model.disable_adapter():
        yield model
