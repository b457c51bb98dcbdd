"""Prompt files for `strop generate`: JSONL rows (prompt | messages | question | instruction+input, as
RL prompts are read: data/prompts.py) or text lines."""

from __future__ import annotations

from pathlib import Path

from strop.core.errors import DataError
from strop.core.io import unreadable_file
from strop.data.prompts import prompt_messages
from strop.data.read import read_rows


def read_prompts(path: str) -> list[dict]:
    """[{id, messages}] where messages end with the user turn to answer."""
    p = Path(path)
    why = unreadable_file(p)
    if why:
        raise DataError(f"prompts file {p}: {why}")
    if p.suffix == ".txt":
        lines = [(n, line.strip()) for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)]
        return [
            {"id": f"{p.name}:{n}", "messages": [{"role": "user", "content": text}]}
            for n, text in lines
            if text
        ]
    return [
        {"id": str(row.data.get("id", row.where)), "messages": prompt_messages(row.data, row.where)}
        for row in read_rows(str(p))
    ]
