"""Sequence classification recipe (`task: classification`): encoder or decoder backbone + head, trained
head-only, with frozen blocks, with LoRA or fully; optionally distilled from a teacher classifier.

Run directory (as SFT's, recipes/sft.py):
    config.yaml  data_summary.json  metrics.jsonl  result.json  checkpoints/
    model/       backbone (adapter or full), head.safetensors, classifier.json (labels), tokenizer, strop_model.json
    eval/summary.json       accuracy, macro-F1, per-class precision/recall, confusion matrix, explanations
    eval/predictions.jsonl  label and probabilities per evaluation example
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from strop.core.config import RunConfig, load_config
from strop.core.device import autocast
from strop.core.errors import ConfigError
from strop.core.io import atomic_write_json, atomic_write_text
from strop.core.progress import tqdm
from strop.data.batches import collate
from strop.data.classes import build_labelled, class_weights, encode, texts_of
from strop.data.tokenized import TokenizedSet
from strop.eval.attribution import integrated_gradients
from strop.eval.classification import classification_metrics
from strop.export.save import export_classifier
from strop.methods import classify, distill
from strop.models.build import build_classifier
from strop.models.classifier import load_classifier
from strop.models.load import check_same_tokenizer, load_tokenizer, read_run_model
from strop.recipes.lifecycle import TrainResult
from strop.recipes.skeleton import Run, Task, run_task

log = logging.getLogger("strop")


def train_classifier(
    config: RunConfig | dict | str | Path, overrides: list[str] | None = None, show_progress: bool = True
) -> TrainResult:
    cfg = config if isinstance(config, RunConfig) else load_config(config, overrides)
    return run_task(ClassifierTask(), cfg, show_progress)


class ClassifierTask(Task):
    causal_lm = False

    def data(self, run: Run) -> dict:
        cfg = run.cfg
        self.labelled = build_labelled(cfg.data, run.tokenizer, cfg.classify.labels, cfg.train.seed)
        self.train_set, self.validation = self.labelled.train, self.labelled.validation
        return self.labelled.summary

    def build(self, run: Run):
        model, run.amp = build_classifier(run.cfg, self.labelled.labels, run.device, run.dtype)
        log.info(
            "classifier: %s pooling, head %s",
            model.pooling,
            [*run.cfg.classify.head_layers, len(self.labelled.labels)],
        )
        return model

    def objective(self, run: Run, model):
        cfg, labels = run.cfg, self.labelled.labels
        if cfg.method.name == "head":  # feature-based: the backbone runs once, not every epoch
            rows = [*self.train_set.ids, *(self.validation.ids if self.validation is not None else [])]
            t_feat = time.time()
            with tqdm(total=len(rows), desc="features", unit="ex", disable=not run.show_progress) as bar:
                model.cache_features(rows, run.pad_id, cfg.eval.batch_size * 8, bar)
            log.info(
                "head only: backbone features of %d examples cached in %.1f s",
                len(rows),
                time.time() - t_feat,
            )
        weights = class_weights(self.train_set.targets, labels, cfg.classify.class_weights)
        base = classify.Classify(
            evaluate, None if weights is None else torch.tensor(weights, dtype=torch.float32)
        )
        if not cfg.distill:
            return base
        teacher = _teacher(cfg, labels, run.tokenizer, run.device, run.dtype)
        return distill.ClassifierDistill(base, teacher, cfg.distill.temperature, cfg.distill.alpha)

    def export(self, run: Run, model) -> Path:
        return export_classifier(run.run_dir / "model", model, run.tokenizer, run.cfg)

    def evaluate(self, run: Run, model) -> dict | None:
        with autocast(run.device, run.amp):  # scored as the loop's validation scored
            return evaluate_classifier(model, run.tokenizer, self.labelled, run.cfg, run.run_dir)


def evaluate(model, batches) -> dict[str, float]:
    """Validation during training: mean cross-entropy, accuracy and macro-F1."""
    probs, targets = classify.predict(model, batches)
    nll = torch.nn.functional.nll_loss(probs.clamp_min(1e-12).log(), targets).item()
    m = classification_metrics(targets.tolist(), probs.argmax(-1).tolist(), probs.size(1))
    return {"val_loss": nll, "val_accuracy": m["accuracy"], "val_macro_f1": m["macro_f1"]}


def evaluate_classifier(model, tokenizer, data, cfg: RunConfig, run_dir: Path) -> dict | None:
    """Metrics on the test set (else validation), against always predicting the commonest training
    label; predictions with probabilities; token attributions for a few examples."""
    set_name = "test" if data.records["test"] else "validation"
    records = data.records[set_name][: cfg.eval.max_examples]
    if not records:
        log.info("eval: no test or validation set to score")
        return None
    index = {name: i for i, name in enumerate(data.labels)}
    ts = encode(records, tokenizer, index, cfg.data.max_length)
    assert ts.targets is not None  # encode gives every example its class
    probs = predict_probabilities(model, ts, tokenizer.pad_token_id, cfg.eval.batch_size)
    pred = probs.argmax(-1).tolist()
    m = classification_metrics(ts.targets, pred, len(data.labels), data.labels)
    majority = max(data.summary["train_label_counts"], key=data.summary["train_label_counts"].get)
    baseline = classification_metrics(ts.targets, [index[majority]] * len(ts), len(data.labels), data.labels)
    summary = {
        "task": "classification",
        "set": set_name,
        "examples": len(ts),
        "labels": data.labels,
        "metrics": {k: {"tuned": m[k], "majority": baseline[k]} for k in ("accuracy", "macro_f1")},
        "majority_label": majority,
        "per_class": m["per_class"],
        "confusion": m["confusion"],
        "explanations": explain_examples(
            model, tokenizer, records[: cfg.classify.explain], cfg.data.max_length
        ),
    }
    out = run_dir / "eval"
    out.mkdir(exist_ok=True)
    rows = [
        {"id": r.id, "label": r.label, "predicted": data.labels[p], "probabilities": _named(q, data.labels)}
        for r, p, q in zip(records, pred, probs.tolist(), strict=True)
    ]
    atomic_write_text(out / "predictions.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    atomic_write_json(out / "summary.json", summary)
    log.info(
        "eval: accuracy %.3f, macro-F1 %.3f on %d %s examples (majority-label baseline %.3f)",
        m["accuracy"],
        m["macro_f1"],
        len(ts),
        set_name,
        baseline["accuracy"],
    )
    return summary


def predict_texts(
    model, tokenizer, texts: list[tuple[str, str | None]], batch_size: int, max_length: int = 512
):
    """(n, labels) probabilities for (text, pair) tuples."""
    pairs = [p for _, p in texts] if texts and texts[0][1] is not None else None
    enc = tokenizer([t for t, _ in texts], pairs, truncation=True, max_length=max_length)["input_ids"]
    ts = TokenizedSet(
        [np.asarray(x, dtype=np.int64) for x in enc],
        [np.zeros(len(x), bool) for x in enc],
        [str(i) for i in range(len(enc))],
    )
    return predict_probabilities(model, ts, tokenizer.pad_token_id, batch_size)


@torch.no_grad()
def predict_probabilities(model, ts, pad_id: int, batch_size: int) -> torch.Tensor:
    """(n, labels) probabilities, batches sorted by length (little padding), returned in input order."""
    device = next(model.parameters()).device
    order = sorted(range(len(ts)), key=lambda i: len(ts.ids[i]))
    out = torch.zeros(len(ts), len(model.labels))
    was_training = model.training
    model.eval()
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        b = collate(ts, idx, pad_id)
        logits = model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device))
        out[idx] = logits.float().softmax(-1).cpu()
    model.train(was_training)
    return out


def explain(
    model, tokenizer, text: str, pair: str | None = None, max_length: int = 512, steps: int = 32
) -> dict:
    """The predicted label and each token's integrated-gradients attribution towards it."""
    enc = tokenizer(text, pair, truncation=True, max_length=max_length, return_tensors="pt")
    device = next(model.parameters()).device
    ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    model.eval()
    with torch.no_grad():
        probs = model(input_ids=ids, attention_mask=mask).float().softmax(-1)[0]
    target = int(probs.argmax())
    embeds = model.input_embeddings()(ids).detach()

    def forward(e, m):
        return model(inputs_embeds=e, attention_mask=m)

    ig = integrated_gradients(forward, embeds, mask, target, steps=steps)
    tokens = tokenizer.convert_ids_to_tokens(ids[0].tolist())
    return {
        "predicted": model.labels[target],
        "probability": float(probs[target]),
        "tokens": tokens,
        "attributions": [round(float(a), 5) for a in ig.attributions],
        "completeness_gap": float(ig.delta),
    }


def explain_examples(model, tokenizer, records, max_length: int) -> list[dict]:
    return [
        {"id": r.id, "label": r.label, **explain(model, tokenizer, *texts_of(r), max_length=max_length)}
        for r in records
    ]


def _named(probs: list[float], labels: list[str]) -> dict[str, float]:
    return {name: round(p, 6) for name, p in zip(labels, probs, strict=True)}


def _teacher(cfg: RunConfig, labels: list[str], tokenizer, device, dtype):
    """A strop classification run with the same labels and tokenizer, frozen."""
    assert cfg.distill is not None  # called for distill runs only
    run = read_run_model(Path(cfg.distill.teacher).expanduser())
    if run is None or run.get("task") != "classification":
        raise ConfigError(f"distill.teacher: {cfg.distill.teacher} is not a strop classification run")
    if run.get("labels") != labels:
        raise ConfigError(
            f"distill.teacher: the teacher's labels {run.get('labels')} differ from this run's {labels}"
        )
    check_same_tokenizer(load_tokenizer(run["dir"]), tokenizer)
    teacher = load_classifier(Path(run["dir"]), run["base_model"], device, dtype)
    return teacher.requires_grad_(False)
