"""Rollouts for PPO and GRPO: sample replies from the policy, score them, and lay them out as a batch.

`sample` generates through the decoding engine (continuous batching, KV cache, sampling), ends each
reply at its end-of-turn token and returns right-padded prompt + reply rows with `labels` on the reply tokens only, the same
layout as supervised batches, so the objectives in methods/rl.py read them like any other batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from strop.data.batches import IGNORE
from strop.data.prompts import Prompt
from strop.data.template import ChatTemplate
from strop.models.engine import Request
from strop.models.generate import engine_for

# (prompts, replies) -> one score per reply; the recipe builds it from a function or a reward run
Reward = Callable[[list[Prompt], list[str]], list[float]]


@dataclass
class Samples:
    batch: dict[str, torch.Tensor]  # input_ids, attention_mask, labels (B, T); response_mask (B, T_reply)
    prompts: list[Prompt]
    replies: list[str]
    lengths: list[int]  # reply tokens, end-of-turn included
    ended: list[bool]  # the reply ended its turn (False: cut off at max_new_tokens)


def sample(
    model: nn.Module,
    template: ChatTemplate,
    prompts: list[Prompt],
    max_new_tokens: int,
    temperature: float,
    top_p: float = 1.0,
    greedy: bool = False,
    batch_size: int = 16,
    seeds: list[int] | None = None,
) -> Samples:
    """One reply per prompt (repeat a prompt to sample several), in the prompts' order; `seeds`: one
    per prompt, each reply then drawn from its own generator (else from torch's global one).

    Sampling draws from softmax(logits / temperature) after top-p, the distribution response_logps
    scores: the engine applies none of the logit processors a model's generation_config may switch on.
    """
    tok = template.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    requests = [
        Request(
            list(p.ids),
            max_new_tokens=max_new_tokens,
            temperature=0.0 if greedy else temperature,
            top_p=top_p,
            seed=None if seeds is None else seeds[i],
        )
        for i, p in enumerate(prompts)
    ]
    engine_for(model, template, batch_size).run(requests)
    replies = [r.tokens for r in requests]
    ended = [bool(r.tokens) and r.tokens[-1] in template.stop_ids for r in requests]
    texts = [tok.decode(r, skip_special_tokens=True).strip() for r in replies]
    lengths = [len(r) for r in replies]
    return Samples(layout([p.ids for p in prompts], replies, pad), prompts, texts, lengths, ended)


def layout(prompt_ids: list, reply_ids: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded prompt + reply rows; labels on reply tokens only; response_mask (B, T_reply)."""
    rows = [list(p) + r for p, r in zip(prompt_ids, reply_ids, strict=True)]
    width, reply_width = max(map(len, rows)), max(1, max(map(len, reply_ids)))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE)
    attention = torch.zeros_like(ids)
    response_mask = torch.zeros((len(rows), reply_width), dtype=torch.bool)
    for b, (row, reply) in enumerate(zip(rows, reply_ids, strict=True)):
        ids[b, : len(row)] = torch.tensor(row)
        attention[b, : len(row)] = 1
        labels[b, len(row) - len(reply) : len(row)] = torch.tensor(reply, dtype=torch.long)
        response_mask[b, : len(reply)] = True
    return {"input_ids": ids, "attention_mask": attention, "labels": labels, "response_mask": response_mask}


def evaluate_reward(
    model: nn.Module,
    template: ChatTemplate,
    prompts: list[Prompt],
    reward: Reward,
    max_new_tokens: int,
    batch_size: int = 16,
) -> dict:
    """Mean reward of greedy replies to held-out prompts; the replies and scores for the report."""
    s = sample(model, template, prompts, max_new_tokens, 1.0, greedy=True, batch_size=batch_size)
    scores = reward(prompts, s.replies)
    return {
        "reward": sum(scores) / max(len(scores), 1),
        "reply_tokens": sum(s.lengths) / max(len(s.lengths), 1),
        "samples": [
            {"id": p.id, "prompt": p.messages[-1]["content"], "reply": r, "reward": x}
            for p, r, x in zip(prompts, s.replies, scores, strict=True)
        ],
    }
