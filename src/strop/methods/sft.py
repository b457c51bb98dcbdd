"""Supervised fine-tuning: next-token cross-entropy on response tokens only.

Returns the *sum* of token losses and the token count, so the loop can normalize over the label
tokens of the whole effective batch (micro-batch 8 x 1 equals 2 x 4).
The LM head runs only at positions that carry a label, with the cross-entropy chunked so the
(B, T, V) logits are never materialized (`lm_loss`); models whose logits it cannot reproduce take
the standard full-logits path.
Reference: Ouyang et al. 2022 (instruction tuning), https://arxiv.org/abs/2203.02155
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from strop.data.batches import IGNORE
from strop.data.packing import MODEL_KEYS
from strop.methods.lm_loss import hidden_and_head, linear_cross_entropy
from strop.methods.objective import Loss, RowObjective

MODEL_INPUTS = ("attention_mask", *MODEL_KEYS)


def loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum of cross-entropy over label tokens, number of label tokens) for one micro-batch."""
    # padded batches carry attention_mask; packed rows carry position_ids that restart per example and
    # the segment boundaries the attention reads (strop.data.packing.MODEL_KEYS)
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    targets = batch["labels"][:, 1:]  # (B, T-1): position t predicts token t+1
    keep = targets != IGNORE  # (B, T-1)
    parts = hidden_and_head(model)
    if parts is None:
        logits = model(**inputs).logits[:, :-1].float()  # (B, T-1, V)
        total = F.cross_entropy(
            logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE, reduction="sum"
        )
        return total, int(keep.sum())
    backbone, head = parts
    hidden = backbone(**inputs, use_cache=False).last_hidden_state  # (B, T, d)
    total = linear_cross_entropy(hidden[:, :-1][keep], head.weight, targets[keep])  # (N, d), (V, d), (N,)
    return total, int(keep.sum())


class SFT(RowObjective):
    """Next-token cross-entropy on the trained tokens; the count is the label tokens. Trains on padded
    or packed rows."""

    packs = True

    def loss(self, model, batch) -> Loss:
        return Loss(*loss(model, batch))

    def evaluate(self, model, batches) -> dict[str, float]:
        return evaluate(model, batches)


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


@torch.no_grad()
def example_losses(
    model: torch.nn.Module, ts, pad_id: int, device: torch.device, progress=None
) -> list[float]:
    """Each example's mean loss over its label tokens, one example at a time (no padding): a
    curriculum's difficulty as the model sees it before training."""
    from strop.data.batches import collate

    was_training = model.training
    model.eval()
    out = []
    for i in range(len(ts)):
        batch = {k: v.to(device) for k, v in collate(ts, [i], pad_id).items()}
        s, n = loss(model, batch)
        out.append(float(s) / max(n, 1))
        if progress is not None:
            progress.update(1)
    model.train(was_training)
    return out
