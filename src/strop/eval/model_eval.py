"""One model on one evaluation set: likelihood of the references, generations, and task metrics.

The same functions score a base model, its tuned version (for LoRA: the same weights with the
adapter switched off, so no second copy in memory) and a k-shot prompted base model.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from strop.data.batches import collate
from strop.data.formats import Record
from strop.data.template import ChatTemplate
from strop.data.tokenized import TokenizedSet, tokenize_records
from strop.eval.examples import EvalExample
from strop.eval.metrics import Metric
from strop.methods import sft
from strop.models.generate import generate


@dataclass
class GenerationSettings:
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    batch_size: int = 8


@dataclass
class ModelResult:
    predictions: list[str]
    scores: dict[str, float]  # metric name -> score on the whole set
    per_example: dict[str, list[float]]  # metric name -> score per example (mean metrics only)
    loss: float | None  # mean token loss of the references (None when not measured)
    seconds: float

    @property
    def ppl(self) -> float | None:
        return None if self.loss is None else math.exp(min(self.loss, 50.0))


def answer(
    model, template: ChatTemplate, conversations: list[list[dict]], gen: GenerationSettings, progress: bool
) -> list[str]:
    return generate(
        model,
        template,
        conversations,
        max_new_tokens=gen.max_new_tokens,
        temperature=gen.temperature,
        top_p=gen.top_p,
        batch_size=gen.batch_size,
        stop=gen.stop,
        progress=progress,
    )


def reference_loss(
    model, template: ChatTemplate, examples: list[EvalExample], max_length: int, batch_size: int
) -> float | None:
    """Mean token cross-entropy of each reference reply given its prompt (the training loss's measure)."""
    records = [
        Record(e.id, messages=(*e.prompt, {"role": "assistant", "content": e.reference})) for e in examples
    ]
    ts = tokenize_records(records, template, max_length, train_on_prompt=False)
    return _mean_loss(model, ts, batch_size, template.tokenizer.pad_token_id)


def text_loss(model, template: ChatTemplate, text: str, max_length: int, batch_size: int) -> float | None:
    """Mean token cross-entropy over a plain text cut into windows of `max_length` tokens."""
    records = [Record("reference", text=text)]
    ts = tokenize_records(records, template, max_length, train_on_prompt=True)
    return _mean_loss(model, ts, batch_size, template.tokenizer.pad_token_id)


def _mean_loss(model, ts: TokenizedSet, batch_size: int, pad_id: int | None) -> float | None:
    if len(ts) == 0:
        return None
    device = next(model.parameters()).device
    pad = pad_id if pad_id is not None else 0  # padded positions are masked and carry no label
    order = sorted(range(len(ts)), key=lambda i: len(ts.ids[i]))  # similar lengths share a batch
    batches = [
        {k: v.to(device) for k, v in collate(ts, order[i : i + batch_size], pad).items()}
        for i in range(0, len(order), batch_size)
    ]
    return sft.evaluate(model, batches)["val_loss"]


def evaluate_model(
    model,
    template: ChatTemplate,
    examples: list[EvalExample],
    conversations: list[list[dict]],
    metrics: list[Metric],
    gen: GenerationSettings,
    max_length: int,
    progress: bool = True,
    with_loss: bool = True,
) -> ModelResult:
    """Generate for `conversations` (the examples' prompts, or k-shot versions of them) and score the
    replies against the examples' references; with_loss adds the references' likelihood."""
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    with torch.no_grad():
        preds = answer(model, template, conversations, gen, progress)
        loss = reference_loss(model, template, examples, max_length, gen.batch_size) if with_loss else None
    model.train(was_training)
    refs = [e.reference for e in examples]
    scores = {m.name: m.score(preds, refs) for m in metrics}
    per_example = {
        m.name: [float(m.per_example(p, r)) for p, r in zip(preds, refs, strict=True)]
        for m in metrics
        if m.per_example is not None
    }
    return ModelResult(preds, scores, per_example, loss, time.perf_counter() - t0)
