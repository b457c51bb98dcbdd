"""Prompt files for `strop generate`: JSONL rows (prompt | messages | instruction+input) or text lines."""

from __future__ import annotations

from pathlib import Path

from strop.core.errors import DataError
from strop.data.formats import alpaca_user_turn
from strop.data.read import read_rows


def read_prompts(path: str) -> list[dict]:
    """[{id, messages}] where messages end with the user turn to answer."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"prompts file not found: {p}")
    if p.suffix == ".txt":
        lines = [(n, line.strip()) for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)]
        return [
            {"id": f"{p.name}:{n}", "messages": [{"role": "user", "content": text}]}
            for n, text in lines
            if text
        ]
    items = []
    for row in read_rows(str(p)):
        d = row.data
        rid = str(d.get("id", row.where))
        if isinstance(d.get("messages"), list):
            msgs = [m for m in d["messages"] if isinstance(m, dict)]
            if msgs and msgs[-1].get("role") == "assistant":
                msgs = msgs[:-1]  # answer the last user turn, not the reference reply
        elif isinstance(d.get("prompt"), str):
            msgs = [{"role": "user", "content": d["prompt"]}]
        elif isinstance(d.get("instruction"), str):
            msgs = [
                {"role": "user", "content": alpaca_user_turn(d["instruction"], str(d.get("input") or ""))}
            ]
        else:
            raise DataError(f"{row.where}: expected a 'prompt', 'messages' or 'instruction' field")
        if not msgs or any(not isinstance(m.get("content"), str) for m in msgs):
            raise DataError(f"{row.where}: field 'messages': expected a list of {{role, content}} turns")
        items.append({"id": rid, "messages": msgs})
    return items
