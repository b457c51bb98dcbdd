"""Supervised fine-tuning: next-token cross-entropy on response tokens only.

Returns the *sum* of token losses and the token count, so the loop can normalize over the label
tokens of the whole effective batch (micro-batch 8 x 1 equals 2 x 4).
Reference: Ouyang et al. 2022 (instruction tuning), https://arxiv.org/abs/2203.02155
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from strop.data.batches import IGNORE


def loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum of cross-entropy over label tokens, number of label tokens) for one micro-batch."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
    targets = batch["labels"][:, 1:]  # (B, T-1): position t predicts token t+1
    logits = logits[:, :-1].float()
    total = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    return total, int((targets != IGNORE).sum())


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches) -> dict[str, float]:
    """Mean token loss and perplexity over validation batches."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        s, n = loss(model, batch)
        total += float(s)
        count += n
    model.train(was_training)
    mean = total / max(count, 1)
    return {"val_loss": mean, "val_ppl": float(torch.exp(torch.tensor(min(mean, 50.0))))}
