"""Sequence classification: cross-entropy over the labels, optionally weighted per class.

Returns the *sum* over examples (weighted) and the example count, so the loop averages over the
examples of the whole effective batch, as SFT does over tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from strop.methods.objective import Loss, RowObjective


def loss(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, int]:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])  # (b, labels)
    target = batch["class_labels"]  # (b,)
    w = None if weights is None else weights.to(logits.device)
    return F.cross_entropy(logits, target, weight=w, reduction="sum"), len(target)


class Classify(RowObjective):
    """Cross-entropy over the labels (class-weighted when `weights`); the count is the examples. Its
    batches carry `class_labels`; `evaluate` is the recipe's (loss, accuracy, macro-F1)."""

    def __init__(self, evaluate, weights: torch.Tensor | None = None):
        self.weights, self._evaluate = weights, evaluate

    def loss(self, model, batch) -> Loss:
        return Loss(*loss(model, batch, self.weights))

    def evaluate(self, model, batches) -> dict[str, float]:
        return self._evaluate(model, batches)


@torch.no_grad()
def predict(model: torch.nn.Module, batches) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities (n, labels), targets (n,)) over batches, in batch order."""
    was_training = model.training
    model.eval()
    probs, targets = [], []
    for batch in batches:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        probs.append(logits.float().softmax(-1).cpu())
        targets.append(batch["class_labels"].cpu())
    model.train(was_training)
    return torch.cat(probs), torch.cat(targets)
