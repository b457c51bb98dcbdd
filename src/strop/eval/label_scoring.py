"""Classification with a causal LM, scored by constrained label likelihood: each candidate label is
rendered as the assistant's reply under the chat template, and the label whose reply tokens (with the
end-of-turn) have the highest total log-probability wins. No free text is generated or parsed, so a
base model's zero-shot (or k-shot) accuracy is directly comparable with the tuned model's.
(The "rank classification" of Brown et al. 2020 and the T0 / FLAN evaluations.)
"""

from __future__ import annotations

import torch

from strop.data.batches import IGNORE
from strop.data.template import ChatTemplate


@torch.no_grad()
def label_logprobs(
    model: torch.nn.Module,
    template: ChatTemplate,
    prompts: list[list[dict]],
    labels: list[str],
    batch_size: int = 16,
    shots: list[dict] | None = None,
) -> torch.Tensor:
    """(n, labels) summed log-probabilities of each label as the reply to each prompt. `shots`:
    earlier user/assistant turns put before every prompt (k-shot)."""
    device = next(model.parameters()).device
    rows, owners = [], []
    for i, messages in enumerate(prompts):
        for j, label in enumerate(labels):
            enc = template.encode([*(shots or []), *messages, {"role": "assistant", "content": label}])
            # only the final reply counts (shots' replies are part of the context)
            last = _last_reply(enc.trained)
            rows.append((enc.ids, [t if k in last else False for k, t in enumerate(enc.trained)]))
            owners.append((i, j))
    out = torch.full((len(prompts), len(labels)), float("-inf"))
    was_training = model.training
    model.eval()
    order = sorted(range(len(rows)), key=lambda r: len(rows[r][0]))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(rows[r][0]) for r in chunk)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        target = torch.full_like(ids, IGNORE)
        for b, r in enumerate(chunk):
            tok, trained = rows[r]
            ids[b, : len(tok)] = torch.tensor(tok)
            mask[b, : len(tok)] = 1
            target[b, : len(tok)] = torch.where(torch.tensor(trained), torch.tensor(tok), IGNORE)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, :-1].float()
        tgt = target[:, 1:].to(device)
        logp = torch.log_softmax(logits, -1).gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        scores = (logp * (tgt != IGNORE)).sum(-1).cpu()
        for b, r in enumerate(chunk):
            out[owners[r]] = scores[b]
    model.train(was_training)
    return out


def _last_reply(trained: list[bool]) -> set[int]:
    """Positions of the last run of trained tokens (the final assistant reply)."""
    end = max(k for k, t in enumerate(trained) if t)
    start = end
    while start > 0 and trained[start - 1]:
        start -= 1
    return set(range(start, end + 1))
