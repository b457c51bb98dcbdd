"""Evaluation examples: a prompt conversation and the reference reply; k-shot prompts built from them."""

from __future__ import annotations

import random
from dataclasses import dataclass

from strop.data.formats import Record
from strop.data.tools import TOOLS_ROLE, reply_text


@dataclass(frozen=True)
class EvalExample:
    id: str
    prompt: tuple[dict, ...]  # the conversation before its final assistant turn
    reference: str  # that assistant turn's content (and its tool calls, data/tools.py::reply_text)


def eval_examples(records: list[Record], limit: int | None = None) -> list[EvalExample]:
    """Conversations that end with an assistant turn, as (prompt, reference); plain text is skipped."""
    out = []
    for rec in records:
        if rec.messages and rec.messages[-1]["role"] == "assistant" and len(rec.messages) > 1:
            out.append(EvalExample(rec.id, tuple(rec.messages[:-1]), reply_text(rec.messages[-1])))
        if limit is not None and len(out) >= limit:
            break
    return out


def pick_shots(pool: list[EvalExample], k: int, seed: int) -> list[EvalExample]:
    """k seeded examples from the shorter half of the pool (short shots keep CPU prompts cheap)."""
    if k <= 0 or not pool:
        return []
    by_length = sorted(pool, key=lambda e: sum(len(m["content"]) for m in e.prompt) + len(e.reference))
    shorter = by_length[: max(k, len(by_length) // 2)]
    return random.Random(seed).sample(shorter, min(k, len(shorter)))


def with_shots(example: EvalExample, shots: list[EvalExample]) -> list[dict]:
    """The example's conversation preceded by the shots as earlier user/assistant exchanges; a system
    message of the example stays first, the shots' own system messages are dropped."""
    head = ("system", TOOLS_ROLE)  # the example's tool definitions stay first too; the shots' are dropped
    system = [m for m in example.prompt if m["role"] in head]
    turns: list[dict] = []
    for shot in shots:
        turns += [m for m in shot.prompt if m["role"] not in head]
        turns.append({"role": "assistant", "content": shot.reference})
    return system + turns + [m for m in example.prompt if m["role"] not in head]
