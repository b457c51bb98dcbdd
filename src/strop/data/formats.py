"""Rows -> records. A record is either a conversation (`messages`) or plain text (`text`).

Formats: alpaca (instruction/input/output), messages (OpenAI role/content), sharegpt (from/value),
prompt_completion, question_answer (GSM8K-style question/answer), labelled (text/label: the label is the
response), preference (prompt/chosen/rejected: the conversation ends with the chosen reply), feedback
(prompt/completion/label true|false: one completion marked good or bad, for KTO), text. Field
names can be mapped; the format is the one most of the first rows show.
"""

from __future__ import annotations

import itertools
import math
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace

from strop.core.errors import DataError
from strop.data.read import Rejected, Row

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
    label: str | None = None  # labelled rows: also the assistant turn
    rejected: str | None = None  # preference rows: the reply not chosen (messages end with the chosen one)
    margin: float | None = None  # preference rows: how strongly chosen is preferred (reward models' margin)
    pair: str | None = None  # labelled rows with a second text (`text_pair`: entailment, similarity)
    desirable: bool | None = None  # feedback rows: whether the completion (the last turn) is a good one


def detect_format(row: dict) -> str | None:
    keys = set(row)
    for key in ("messages", "conversations"):
        turns = row.get(key)
        if isinstance(turns, list) and turns and isinstance(turns[0], dict):
            if "tools" in row or any(isinstance(t, dict) and "tool_calls" in t for t in turns):
                return "tools"
            return "sharegpt" if "from" in turns[0] else "messages"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"chosen", "rejected"} <= keys:
        return "preference"
    if {"prompt", "completion", "label"} <= keys:
        return "feedback"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if {"question", "answer"} <= keys:
        return "question_answer"
    if {"text", "label"} <= keys:
        return "labelled"
    if "text" in keys:
        return "text"
    return None


DETECT_ROWS = 1000  # the format is the one most of the first rows show, so one odd first row cannot decide


def check_fields(source: str, first: dict, fields: dict[str, str]) -> None:
    """Every column a source's `fields` maps from exists (in its first row): a misspelt name is an error,
    never a silently unmapped field."""
    for ours, theirs in fields.items():
        if theirs not in first:
            raise DataError(
                f"{source}: fields.{ours}: column {theirs!r} is not in the data "
                f"(columns of the first row: {', '.join(sorted(map(str, first)))})"
            )


def to_records(
    rows: list[Row],
    fmt: str,
    fields: dict[str, str],
    source: str,
    rejected: list[Rejected] | None = None,
) -> tuple[list[Record], str]:
    """Convert rows; returns the records and the format used (detected when `fmt == 'auto'`).

    Malformed rows stop the conversion with an error listing them (file:line, field, reason), unless
    `rejected` is given: then they are appended there and left out.
    """
    records, fmt = stream_records(rows, fmt, fields, source, rejected)
    return list(records), fmt


def stream_records(
    rows: Iterable[Row],
    fmt: str,
    fields: dict[str, str],
    source: str,
    rejected: list[Rejected] | None = None,
) -> tuple[Iterator[Record], str]:
    """`to_records` as a stream: the first `DETECT_ROWS` rows are read now (to detect the format), the
    rest as the records are taken. Malformed rows are gathered and reported when the stream ends, as
    `to_records` reports them: one error listing them, or appended to `rejected` (after the rows the
    reader rejected)."""
    stream = iter(rows)
    head = list(itertools.islice(stream, DETECT_ROWS))
    if not head:
        raise DataError(f"{source}: no rows")
    check_fields(source, head[0].data, fields)
    if fmt == "auto":
        votes = Counter(f for f in (detect_format(_rename(r.data, fields)) for r in head) if f is not None)
        if not votes:
            raise DataError(
                f"{head[0].where}: cannot detect the data format from fields {sorted(map(str, head[0].data))}; "
                "expected one of: instruction+output (alpaca), messages, conversations (sharegpt), "
                "prompt+chosen+rejected (preference), prompt+completion+label (feedback), prompt+completion, "
                "question+answer, text+label "
                "(labelled), text. Set data.train[].format and data.train[].fields to map yours."
            )
        fmt = votes.most_common(1)[0][0]
    return _convert(itertools.chain(head, stream), fmt, fields, source, rejected), fmt


def _convert(
    rows: Iterator[Row], fmt: str, fields: dict[str, str], source: str, rejected: list[Rejected] | None
) -> Iterator[Record]:
    convert = _CONVERTERS[fmt]
    errors = []
    for row in rows:
        data = _rename(row.data, fields)
        try:
            yield replace(convert(data, _row_id(data, row)), where=row.where)
        except _RowError as e:
            errors.append(Rejected(row.where, fields.get(e.field, e.field), e.reason))
    if errors and rejected is None:
        more = f"\n  ... and {len(errors) - 10} more" if len(errors) > 10 else ""
        raise DataError(
            f"{len(errors)} malformed row(s) in {source} (format {fmt}):\n  "
            + "\n  ".join(map(str, errors[:10]))
            + more
            + "\n(`strop data check` lists them all; data.skip_bad_rows: true leaves them out)"
        )
    if rejected is not None:
        rejected += errors


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


# C0 controls and DEL, bar tab, newline, carriage return and form feed (which code files carry)
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def check_string(value: str, field: str) -> str:
    """A string fit to tokenize: no control characters and no unpaired surrogates (JSON's "\\ud800")."""
    if m := _CONTROL.search(value):
        raise _RowError(field, f"control character U+{ord(m.group()):04X} at position {m.start()}")
    if m := _SURROGATE.search(value):
        raise _RowError(
            field, f"unpaired surrogate U+{ord(m.group()):04X} (invalid Unicode) at position {m.start()}"
        )
    return value


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
    return check_string(value, field)


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


def _turns(
    turns: object, field: str, role_key: str, content_key: str, roles: dict[str, str], need_reply: bool = True
) -> list[dict]:
    if not isinstance(turns, list) or not turns:
        raise _RowError(field, "expected a non-empty list of turns")
    msgs = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict):
            raise _RowError(f"{field}[{i}]", f"expected an object, got {type(t).__name__}")
        role = t.get(role_key)
        if not isinstance(role, str) or role not in roles:
            raise _RowError(f"{field}[{i}].{role_key}", f"unknown role {role!r} (allowed: {sorted(roles)})")
        content = t.get(content_key)
        if not isinstance(content, str):
            raise _RowError(f"{field}[{i}].{content_key}", "expected a string")
        check_string(content, f"{field}[{i}].{content_key}")
        msgs.append({"role": roles[role], "content": content})
    if need_reply and not any(m["role"] == "assistant" for m in msgs):
        raise _RowError(field, "conversation has no assistant turn to learn from")
    for i, m in enumerate(msgs):
        if m["role"] == "assistant" and not m["content"].strip():
            raise _RowError(f"{field}[{i}].{content_key}", "empty assistant turn")
    return msgs


def _conversation_field(data: dict) -> str:
    return "messages" if "messages" in data else "conversations"


_OPENAI_ROLES = {r: r for r in ROLES}


def _messages(data: dict, rid: str) -> Record:
    field = _conversation_field(data)
    return Record(rid, messages=tuple(_turns(data.get(field), field, "role", "content", _OPENAI_ROLES)))


def _tool_conversation(data: dict, rid: str) -> Record:
    """data/tools.py: definitions, assistant calls and tool results, checked field by field."""
    from strop.data.tools import TOOLS_ROLE, ToolError, check_calls, check_tools

    try:
        tools = check_tools(data.get("tools"))
        defined = {t["function"]["name"] for t in tools}
        turns = data.get("messages")
        if not isinstance(turns, list) or not turns:
            raise ToolError("messages", "expected a non-empty list of turns")
        msgs: list[dict] = [{"role": TOOLS_ROLE, "tools": tools, "content": ""}]
        calls_made = 0
        for i, t in enumerate(turns):
            field = f"messages[{i}]"
            if not isinstance(t, dict) or t.get("role") not in ROLES:
                role = t.get("role") if isinstance(t, dict) else None
                raise ToolError(f"{field}.role", f"unknown role {role!r} (allowed: {sorted(ROLES)})")
            content = t.get("content")
            content = "" if content is None and t["role"] in ("assistant",) else content
            if not isinstance(content, str):
                raise ToolError(f"{field}.content", "expected a string")
            check_string(content, f"{field}.content")
            m: dict = {"role": t["role"], "content": content}
            if t["role"] == "assistant" and "tool_calls" in t:
                m["tool_calls"] = check_calls(t, field, defined)
                calls_made += len(m["tool_calls"])
            elif t["role"] == "assistant" and not content.strip():
                raise ToolError(f"{field}.content", "empty assistant turn (and no tool_calls)")
            elif "tool_calls" in t:
                raise ToolError(f"{field}.tool_calls", f"only assistant turns call tools, not {t['role']}")
            if t["role"] == "tool":
                if calls_made == 0:
                    raise ToolError(field, "a tool turn with no tool call before it")
                calls_made -= 1
                for key in ("tool_call_id", "name"):
                    if isinstance(t.get(key), str):
                        m[key] = t[key]
            msgs.append(m)
    except ToolError as e:
        raise _RowError(e.field, e.reason) from None
    if not any(m["role"] == "assistant" for m in msgs):
        raise _RowError("messages", "conversation has no assistant turn to learn from")
    return Record(rid, messages=tuple(msgs))


def _sharegpt(data: dict, rid: str) -> Record:
    field = _conversation_field(data)
    return Record(rid, messages=tuple(_turns(data.get(field), field, "from", "value", SHAREGPT_ROLES)))


def _labelled(data: dict, rid: str) -> Record:
    label = data.get("label")
    if isinstance(label, bool) or not isinstance(label, (str, int)):
        raise _RowError("label", f"expected a string or an integer, got {type(label).__name__}")
    label = check_string(str(label).strip(), "label")
    if not label:
        raise _RowError("label", "empty or whitespace-only")
    text, pair = _text(data, "text"), _text(data, "text_pair", required=False) or None
    if pair is not None and not pair.strip():
        raise _RowError("text_pair", "empty or whitespace-only")
    prompt = text if pair is None else f"{text}\n\n{pair}"
    msgs = ({"role": "user", "content": prompt}, {"role": "assistant", "content": label})
    return Record(rid, messages=msgs, label=label, pair=pair)


_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ \t]?")


def hh_turns(transcript: str) -> list[dict]:
    """Anthropic HH-style "Human: ...\\n\\nAssistant: ..." text as turns (a trailing empty
    "Assistant:" tag dropped); text without the tags is one user turn."""
    parts = _HH_TURN.split(transcript)
    if len(parts) < 3 or parts[0].strip():
        return [{"role": "user", "content": transcript.strip()}]
    turns = [
        {"role": "user" if who == "Human" else "assistant", "content": text.strip()}
        for who, text in zip(parts[1::2], parts[2::2], strict=True)
    ]
    if turns[-1]["role"] == "assistant" and not turns[-1]["content"]:
        turns.pop()
    return turns


def _preference(data: dict, rid: str) -> Record:
    """prompt + chosen + rejected: strings (the prompt may be an HH transcript or a list of turns),
    or chosen and rejected as whole conversations that differ only in the final assistant turn."""
    chosen, rejected = data.get("chosen"), data.get("rejected")
    if isinstance(chosen, list) and isinstance(rejected, list):
        convo = _turns(chosen, "chosen", "role", "content", _OPENAI_ROLES)
        other = _turns(rejected, "rejected", "role", "content", _OPENAI_ROLES)
        if convo[-1]["role"] != "assistant" or other[-1]["role"] != "assistant" or convo[:-1] != other[:-1]:
            raise _RowError(
                "chosen", "chosen and rejected conversations must share every turn but a final assistant one"
            )
        prompt, chosen, rejected = convo[:-1], convo[-1]["content"], other[-1]["content"]
    else:
        chosen, rejected = _text(data, "chosen").strip(), _text(data, "rejected").strip()
        raw = data.get("prompt", "")
        if isinstance(raw, list):
            prompt = _turns(raw, "prompt", "role", "content", _OPENAI_ROLES, need_reply=False)
        else:
            prompt = hh_turns(_text(data, "prompt"))
    if chosen.strip() == rejected.strip():
        raise _RowError("rejected", "identical to chosen: the pair prefers nothing")
    if not prompt or prompt[-1]["role"] == "assistant":
        raise _RowError("prompt", "the conversation must end with a user turn before the replies")
    msgs = (*prompt, {"role": "assistant", "content": chosen})
    return Record(rid, messages=tuple(msgs), rejected=rejected, margin=_margin(data.get("margin")))


def _prompt_turns(data: dict) -> list[dict]:
    """A preference or feedback row's prompt: a string (an HH transcript becomes turns) or a list of
    turns, ending with a user turn."""
    raw = data.get("prompt")
    if isinstance(raw, list):
        prompt = _turns(raw, "prompt", "role", "content", _OPENAI_ROLES, need_reply=False)
    else:
        prompt = hh_turns(_text(data, "prompt"))
    if not prompt or prompt[-1]["role"] == "assistant":
        raise _RowError("prompt", "the conversation must end with a user turn before the reply")
    return prompt


FEEDBACK_LABELS = {True: True, False: False, "true": True, "false": False, "1": True, "0": False}  # 1 == True


def _feedback(data: dict, rid: str) -> Record:
    """prompt + completion + label: one completion judged good (true) or bad (false), as KTO learns
    from; the label is a JSON boolean (or true/false, 1/0 as CSV gives them)."""
    label = data.get("label")
    key = label.strip().lower() if isinstance(label, str) else label
    if not isinstance(key, (bool, int, str)) or key not in FEEDBACK_LABELS:  # no 1.0, lists or None
        raise _RowError("label", f"expected true or false, got {label!r}")
    prompt = _prompt_turns(data)
    msgs = (*prompt, {"role": "assistant", "content": _text(data, "completion").strip()})
    return Record(rid, messages=tuple(msgs), desirable=FEEDBACK_LABELS[key])


def _margin(value) -> float | None:
    """An optional `margin` field of a preference row: a finite number (or numeric string) >= 0."""
    if value is None:
        return None
    try:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError
        margin = float(value)
    except ValueError:
        raise _RowError("margin", f"expected a number, got {value!r}") from None
    if not math.isfinite(margin) or margin < 0:
        raise _RowError("margin", f"expected a finite number >= 0, got {value!r}")
    return margin


def _plain_text(data: dict, rid: str) -> Record:
    return Record(rid, text=_text(data, "text"))


_CONVERTERS = {
    "alpaca": _alpaca,
    "question_answer": _question_answer,
    "messages": _messages,
    "tools": _tool_conversation,
    "sharegpt": _sharegpt,
    "prompt_completion": _prompt_completion,
    "labelled": _labelled,
    "preference": _preference,
    "feedback": _feedback,
    "text": _plain_text,
}
