"""Rows -> records. A record is either a conversation (`messages`) or plain text (`text`).

Formats: alpaca (instruction/input/output), messages (OpenAI role/content), sharegpt (from/value),
prompt_completion, question_answer (GSM8K-style question/answer), text. Field names can be mapped; the format is detected from the first row.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from strop.core.errors import DataError
from strop.data.read import Row

ROLES = {"system", "user", "assistant", "tool"}
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "tool": "tool",
    "function_call": "assistant",
    "observation": "tool",
}


@dataclass(frozen=True)
class Record:
    id: str
    messages: tuple[dict, ...] | None = None  # ({"role": ..., "content": ...}, ...)
    text: str | None = None
    where: str = ""  # "file:line" of the row, for errors found later (e.g. by the template)


def detect_format(row: dict) -> str | None:
    keys = set(row)
    for key in ("messages", "conversations"):
        turns = row.get(key)
        if isinstance(turns, list) and turns and isinstance(turns[0], dict):
            return "sharegpt" if "from" in turns[0] else "messages"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if {"question", "answer"} <= keys:
        return "question_answer"
    if "text" in keys:
        return "text"
    return None


def to_records(rows: list[Row], fmt: str, fields: dict[str, str], source: str) -> tuple[list[Record], str]:
    """Convert rows; returns the records and the format used (detected when `fmt == 'auto'`)."""
    if not rows:
        raise DataError(f"{source}: no rows")
    for ours, theirs in fields.items():
        if theirs not in rows[0].data:
            raise DataError(
                f"{source}: fields.{ours}: column {theirs!r} is not in the data "
                f"(columns of the first row: {', '.join(sorted(map(str, rows[0].data)))})"
            )
    mapped = [_rename(r.data, fields) for r in rows]
    if fmt == "auto":
        fmt = detect_format(mapped[0])
        if fmt is None:
            raise DataError(
                f"{rows[0].where}: cannot detect the data format from fields {sorted(rows[0].data)}; "
                "expected one of: instruction+output (alpaca), messages, conversations (sharegpt), "
                "prompt+completion, question+answer, text. Set data.train[].format and data.train[].fields to map yours."
            )
    convert = _CONVERTERS[fmt]
    records, errors = [], []
    for row, data in zip(rows, mapped, strict=True):
        try:
            records.append(replace(convert(data, _row_id(data, row)), where=row.where))
        except _RowError as e:
            errors.append(f"{row.where}: field {fields.get(e.field, e.field)!r}: {e.reason}")
    if errors:
        more = f"\n  ... and {len(errors) - 10} more" if len(errors) > 10 else ""
        raise DataError(
            f"{len(errors)} malformed row(s) in {source} (format {fmt}):\n  "
            + "\n  ".join(errors[:10])
            + more
        )
    return records, fmt


class _RowError(Exception):
    def __init__(self, field: str, reason: str):
        self.field, self.reason = field, reason


def _rename(data: dict, fields: dict[str, str]) -> dict:
    if not fields:
        return data
    out = dict(data)
    for ours, theirs in fields.items():
        if theirs in data:
            out[ours] = data[theirs]
    return out


def _row_id(data: dict, row: Row) -> str:
    rid = data.get("id")
    return str(rid) if isinstance(rid, (str, int)) else row.where


def _text(data: dict, field: str, required: bool = True) -> str:
    value = data.get(field)
    if value is None:
        if required:
            raise _RowError(field, "missing")
        return ""
    if not isinstance(value, str):
        raise _RowError(field, f"expected a string, got {type(value).__name__}")
    if required and not value.strip():
        raise _RowError(field, "empty or whitespace-only")
    return value


def alpaca_user_turn(instruction: str, extra: str) -> str:
    """The user turn of an alpaca row: the instruction, then the input (if any) after a blank line."""
    return f"{instruction}\n\n{extra}" if extra.strip() else instruction


def _alpaca(data: dict, rid: str) -> Record:
    user = alpaca_user_turn(_text(data, "instruction"), _text(data, "input", required=False))
    msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": _text(data, "output")}]
    system = _text(data, "system", required=False)
    if system.strip():
        msgs.insert(0, {"role": "system", "content": system})
    return Record(rid, messages=tuple(msgs))


def _question_answer(data: dict, rid: str) -> Record:
    msgs = (
        {"role": "user", "content": _text(data, "question")},
        {"role": "assistant", "content": _text(data, "answer")},
    )
    return Record(rid, messages=msgs)


def _prompt_completion(data: dict, rid: str) -> Record:
    msgs = (
        {"role": "user", "content": _text(data, "prompt")},
        {"role": "assistant", "content": _text(data, "completion")},
    )
    return Record(rid, messages=msgs)


def _turns(data: dict, role_key: str, content_key: str, roles: dict[str, str]) -> list[dict]:
    field = "messages" if "messages" in data else "conversations"
    turns = data.get(field)
    if not isinstance(turns, list) or not turns:
        raise _RowError(field, "expected a non-empty list of turns")
    msgs = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict):
            raise _RowError(f"{field}[{i}]", f"expected an object, got {type(t).__name__}")
        role = t.get(role_key)
        if role not in roles:
            raise _RowError(f"{field}[{i}].{role_key}", f"unknown role {role!r} (allowed: {sorted(roles)})")
        content = t.get(content_key)
        if not isinstance(content, str):
            raise _RowError(f"{field}[{i}].{content_key}", "expected a string")
        msgs.append({"role": roles[role], "content": content})
    if not any(m["role"] == "assistant" for m in msgs):
        raise _RowError(field, "conversation has no assistant turn to learn from")
    for i, m in enumerate(msgs):
        if m["role"] == "assistant" and not m["content"].strip():
            raise _RowError(f"{field}[{i}].{content_key}", "empty assistant turn")
    return msgs


def _messages(data: dict, rid: str) -> Record:
    return Record(rid, messages=tuple(_turns(data, "role", "content", {r: r for r in ROLES})))


def _sharegpt(data: dict, rid: str) -> Record:
    return Record(rid, messages=tuple(_turns(data, "from", "value", SHAREGPT_ROLES)))


def _plain_text(data: dict, rid: str) -> Record:
    return Record(rid, text=_text(data, "text"))


_CONVERTERS = {
    "alpaca": _alpaca,
    "question_answer": _question_answer,
    "messages": _messages,
    "sharegpt": _sharegpt,
    "prompt_completion": _prompt_completion,
    "text": _plain_text,
}
