"""The log-probabilities of label tokens, with the LM head applied in chunks recomputed in backward, so
(tokens x vocabulary) logits never exist for a whole batch: the one copy DPO (methods/dpo.py), RL
(methods/rl.py) and distillation (methods/distill.py) share.

`label_logps` gives log p(label | prefix) of every label position of a batch, flattened in row-major
order (the order of `labels[:, 1:] != IGNORE`); `head_chunks` runs any function of (hidden chunk,
head weight) that way, for losses that read the whole distribution (distillation's KL).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from strop.data.batches import IGNORE
from strop.methods.lm_loss import hidden_and_head

CHUNK = 512  # label positions whose (chunk, V) logits exist at once


def label_logps(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    labels: torch.Tensor,
    temperature: float = 1.0,
    with_hidden: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log-probs (N,) float32, last hidden states (N, d) or None) at the N label positions of `labels`
    (B, T), IGNORE elsewhere; position t predicts label t+1. Log-probs are of logits / temperature (RL
    scores replies under the distribution they were sampled from). `inputs`: the model's keyword
    inputs (input_ids, attention_mask, and for packed rows position ids).

    Fallback: a model whose head strop cannot run itself (`lm_loss.hidden_and_head` is None: prompt
    learning, a wrapped or biased head, logit soft-capping) is run whole, its (B, T, V) logits held.
    """
    keep = labels[:, 1:] != IGNORE  # (B, T-1): positions that predict a label
    targets = labels[:, 1:][keep]  # (N,)
    parts = hidden_and_head(model)
    if parts is None:
        out = model(**inputs, output_hidden_states=with_hidden)
        logits = out.logits[:, :-1][keep].float() / temperature  # (N, V)
        token = logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, -1)
        return token, (out.hidden_states[-1][:, :-1][keep] if with_hidden else None)
    backbone, head = parts
    hidden = backbone(**inputs, use_cache=False).last_hidden_state[:, :-1][keep]  # (N, d)
    pieces = head_chunks(picked_logps, hidden, head.weight, targets, args=(temperature,))
    token = torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)  # (N,)
    return token.float(), (hidden if with_hidden else None)


def picked_logps(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """log_softmax((hidden @ weight.T) / temperature) at `targets`: hidden (n, d), weight (V, d),
    targets (n,) -> (n,) float32."""
    logits = (hidden @ weight.T).float() / temperature  # (n, V)
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, -1)


def head_chunks(
    fn: Callable[..., torch.Tensor],
    hidden: torch.Tensor,
    weight: torch.Tensor,
    *rows: torch.Tensor | Callable[[slice], torch.Tensor],
    args: tuple = (),
    chunk: int | None = None,
) -> list[torch.Tensor]:
    """[fn(hidden[s], weight, *(row[s] for row in rows), *args) for each slice s of `chunk` positions],
    each checkpointed: its (chunk, V) logits are dropped after forward and recomputed in backward.
    hidden (N, d); a row is a tensor (N, ...) sliced alike, or a function of the slice for chunks that
    must be built one at a time outside the recomputation (a teacher's logits, computed once)."""
    size = chunk or CHUNK
    out = []
    for i in range(0, hidden.size(0), size):
        s = slice(i, i + size)
        cut = [r(s) if callable(r) else r[s] for r in rows]
        out.append(checkpoint(fn, hidden[s], weight, *cut, *args, use_reentrant=False))
    return out
