"""Prompt rows for reinforcement learning: the conversation to answer, plus the row's own columns.

A rollout samples replies to these prompts and the reward judges them, so a reward function also gets
each row's columns (a GSM8K `answer`, a required word) as TRL's reward functions do. Accepted rows:
`{messages}` (a final assistant turn, the reference, is set aside), `{prompt}` (text, or an HH-style
"Human: ... Assistant:" transcript, or a list of turns), `{question}`, `{instruction, input}`.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

from strop.core.config import DataConfig, DatasetSource
from strop.core.data_config import MAX_ROW_BYTES
from strop.core.errors import DataError
from strop.data.build import held_out, source_rows
from strop.data.formats import alpaca_user_turn, check_fields, hh_turns
from strop.data.template import ChatTemplate


@dataclass(frozen=True)
class Prompt:
    id: str
    messages: tuple[dict, ...]  # ends with the user turn to answer
    columns: dict = field(default_factory=dict)  # the row's fields, for the reward function
    ids: tuple[int, ...] = ()  # the prompt rendered by the chat template, generation prompt included


def prompt_messages(data: dict, where: str) -> list[dict]:
    """The turns a row asks to answer; a DataError naming `where` and the field when there are none."""
    if isinstance(data.get("messages"), list):
        msgs = [m for m in data["messages"] if isinstance(m, dict)]
        if msgs and msgs[-1].get("role") == "assistant":
            msgs = msgs[:-1]  # the reference reply is not part of the prompt
    elif isinstance(data.get("prompt"), list):
        msgs = [m for m in data["prompt"] if isinstance(m, dict)]
    elif isinstance(data.get("prompt"), str):
        msgs = hh_turns(data["prompt"])
    elif isinstance(data.get("question"), str):
        msgs = [{"role": "user", "content": data["question"]}]
    elif isinstance(data.get("instruction"), str):
        msgs = [
            {"role": "user", "content": alpaca_user_turn(data["instruction"], str(data.get("input") or ""))}
        ]
    else:
        raise DataError(f"{where}: expected a 'prompt', 'messages', 'question' or 'instruction' field")
    bad = [i for i, m in enumerate(msgs) if not isinstance(m.get("content"), str) or "role" not in m]
    if not msgs or bad:
        raise DataError(f"{where}: field 'messages': expected a list of {{role, content}} turns")
    if msgs[-1]["role"] != "user" or not msgs[-1]["content"].strip():
        raise DataError(f"{where}: the prompt must end with a non-empty user turn")
    return msgs


def read_prompts(
    src: DatasetSource, template: ChatTemplate, max_prompt: int, max_row_bytes: int = MAX_ROW_BYTES
) -> tuple[list[Prompt], int]:
    """(prompts, how many were left out for being longer than `max_prompt` tokens)."""
    out, too_long, rows = [], 0, source_rows(src, None, max_row_bytes)
    if rows:
        check_fields(src.path, rows[0].data, src.fields)
    for row in rows:
        data = dict(row.data)
        data |= {ours: row.data[theirs] for ours, theirs in src.fields.items() if theirs in row.data}
        msgs = prompt_messages(data, row.where)
        ids = template.prompt_ids(msgs)
        if len(ids) > max_prompt:
            too_long += 1
            continue
        rid = str(data["id"]) if isinstance(data.get("id"), (str, int)) else row.where
        out.append(Prompt(rid, tuple(msgs), dict(data), tuple(ids)))
    return out, too_long


def prompt_splits(
    cfg: DataConfig, template: ChatTemplate, max_new_tokens: int, seed: int
) -> tuple[dict, dict]:
    """({"train", "validation", "test": [Prompt]}, summary). Prompts leave room for `max_new_tokens`
    within data.max_length; the validation split is held out of train by data.val_fraction when no
    validation source is given."""
    max_prompt = cfg.max_length - max_new_tokens
    if max_prompt < 1:
        raise DataError(
            f"data.max_length ({cfg.max_length}) leaves no room for prompts after rl.max_new_tokens "
            f"({max_new_tokens}); raise data.max_length"
        )
    splits: dict[str, list[Prompt]] = {}
    dropped = 0
    for split, sources in (("train", cfg.train), ("validation", cfg.validation), ("test", cfg.test)):
        splits[split] = []
        for src in sources:
            got, n = read_prompts(src, template, max_prompt, cfg.max_row_bytes)
            splits[split] += got
            dropped += n
    if not cfg.validation and cfg.val_fraction > 0 and len(splits["train"]) >= 2:
        held = set(held_out([p.id for p in splits["train"]], cfg.val_fraction, seed))
        splits["validation"] = [p for i, p in enumerate(splits["train"]) if i in held]
        splits["train"] = [p for i, p in enumerate(splits["train"]) if i not in held]
    if not splits["train"]:
        raise DataError(
            f"data.train: no prompts left ({dropped} longer than {max_prompt} tokens, the room "
            "data.max_length leaves after rl.max_new_tokens)"
        )
    train_text = {json.dumps(p.messages, sort_keys=True) for p in splits["train"]}
    leaked = {
        s: sum(json.dumps(p.messages, sort_keys=True) in train_text for p in splits[s])
        for s in ("validation", "test")
    }
    summary = {
        "train_prompts": len(splits["train"]),
        "validation_prompts": len(splits["validation"]),
        "test_prompts": len(splits["test"]),
        "prompts_too_long": dropped,
        "max_prompt_tokens": max_prompt,
        "held_out_prompts_also_in_train": leaked,
    }
    return splits, summary


def prompt_order(n: int, seed: int, epoch: int) -> list[int]:
    """The training prompts' order in an epoch: a fresh seeded shuffle each epoch."""
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order
