"""Reward model as an objective: a scalar head scores the chosen and the rejected conversation, and the
Bradley-Terry loss -log sigmoid(r_chosen - r_rejected) teaches it to rank them (Ouyang et al. 2022,
https://arxiv.org/abs/2203.02155; `preference.bradley_terry_loss`). The model is a SequenceClassifier
with one output; batches hold the chosen rows then the rejected rows.
"""

from __future__ import annotations

import torch

from strop.methods.preference import bradley_terry_loss


def rewards(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    r = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[:, 0].float()  # (2n,)
    n = int(batch["pairs"])
    return r[:n], r[n:]


def loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    chosen, rejected = rewards(model, batch)
    mean, _ = bradley_terry_loss(chosen, rejected)
    return mean * len(chosen), len(chosen)


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches) -> dict[str, float]:
    """Mean loss, accuracy (chosen scored higher) and mean margin r_chosen - r_rejected."""
    was_training = model.training
    model.eval()
    total = correct = margin = 0.0
    n = 0
    for batch in batches:
        chosen, rejected = rewards(model, batch)
        mean, _ = bradley_terry_loss(chosen, rejected)
        total += float(mean) * len(chosen)
        correct += float((chosen > rejected).sum())
        margin += float((chosen - rejected).sum())
        n += len(chosen)
    model.train(was_training)
    return {
        "val_loss": total / max(n, 1),
        "val_accuracy": correct / max(n, 1),
        "val_margin": margin / max(n, 1),
    }
