"""Tool-calling conversations (data format `tools`), as LLaMA-Factory, Axolotl and TRL take them:

    {"tools": [{"type": "function", "function": {"name": "get_weather", "description": "...",
                "parameters": {...JSON schema...}}}],
     "messages": [{"role": "user", "content": "Weather in Paris?"},
                  {"role": "assistant", "content": "", "tool_calls": [{"type": "function",
                   "function": {"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}}]},
                  {"role": "tool", "content": "{\\"temp\\": 18}"},
                  {"role": "assistant", "content": "It is 18 °C in Paris."}]}

A call's `arguments` may be a JSON string (OpenAI) or an object; they are checked and kept as an
object, which chat templates render with `tojson`. Checked per row, each problem named by its field:
arguments that are not JSON (or not an object), a call to a tool the row does not define, a `tool`
turn with no call before it. The definitions travel as the conversation's first element
`{"role": "tools", "tools": [...], "content": ""}`, which `ChatTemplate.render` hands to the template as
`tools` (so every path that renders a conversation, training, evaluation and chat, sees them). Loss
falls on assistant turns, their calls included; tool results are context.

`CHATML_TOOLS` is the Hermes / Qwen 2.5 format (definitions in <tools></tools> in the system turn,
calls as <tool_call>{"name": ..., "arguments": ...}</tool_call>, results as <tool_response> in a user
turn), for chat models whose own template has no tools (SmolLM2's): `data.template: chatml-tools`.
`call_accuracy` scores a reply's calls against the reference's: the right function, and arguments
that parse and equal the reference's.
"""

from __future__ import annotations

import json
import re
from typing import Any

TOOLS_ROLE = "tools"

CHATML_TOOLS = (  # no whitespace control: strop's Jinja trims the newline after a block tag, so {{ nl }}
    "{% set nl = '\n' %}"
    "{% if tools %}<|im_start|>system\n"
    "{% if messages and messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}{{ nl }}{{ nl }}{% endif %}"
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
    "{% for tool in tools %}{{ nl }}{{ tool | tojson }}{% endfor %}{{ nl }}</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
    "<args-json-object>}\n</tool_call><|im_end|>\n"
    "{% elif messages and messages[0]['role'] == 'system' %}"
    "<|im_start|>system\n{{ messages[0]['content'] }}<|im_end|>{{ nl }}"
    "{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|im_start|>user\n{{ m['content'] }}<|im_end|>{{ nl }}"
    "{% elif m['role'] == 'assistant' %}<|im_start|>assistant\n{{ m['content'] or '' }}"
    "{% for call in m.get('tool_calls') or [] %}"
    "{% if not loop.first or m['content'] %}{{ nl }}{% endif %}"
    '<tool_call>\n{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}'
    "\n</tool_call>"
    "{% endfor %}<|im_end|>{{ nl }}"
    "{% elif m['role'] == 'tool' %}"
    "{% if loop.first or loop.previtem['role'] != 'tool' %}<|im_start|>user{% endif %}"
    "{{ nl }}<tool_response>\n{{ m['content'] }}\n</tool_response>"
    "{% if loop.last or loop.nextitem['role'] != 'tool' %}<|im_end|>{{ nl }}{% endif %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class ToolError(Exception):
    def __init__(self, field: str, reason: str):
        self.field, self.reason = field, reason


def check_tools(tools: Any) -> list[dict]:
    """The row's definitions: a list of {type: function, function: {name, ...}} (a bare {name, ...} is
    wrapped), names unique."""
    if not isinstance(tools, list) or not tools:
        raise ToolError("tools", "expected a non-empty list of tool definitions")
    out, names = [], set()
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) and "function" in t else t
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"].strip():
            raise ToolError(f"tools[{i}].function.name", "expected the tool's name")
        if fn["name"] in names:
            raise ToolError(f"tools[{i}].function.name", f"tool {fn['name']!r} is defined twice")
        names.add(fn["name"])
        out.append({"type": "function", "function": fn})
    return out


def check_calls(turn: dict, field: str, defined: set[str]) -> list[dict]:
    """An assistant turn's tool calls, arguments parsed into objects."""
    calls = turn.get("tool_calls")
    if not isinstance(calls, list) or not calls:
        raise ToolError(f"{field}.tool_calls", "expected a non-empty list of calls")
    out = []
    for j, call in enumerate(calls):
        where = f"{field}.tool_calls[{j}]"
        fn = call.get("function") if isinstance(call, dict) and "function" in call else call
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ToolError(f"{where}.function.name", "expected the called tool's name")
        if fn["name"] not in defined:
            raise ToolError(
                f"{where}.function.name",
                f"calls {fn['name']!r}, which the row's tools do not define ({', '.join(sorted(defined))})",
            )
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError as e:
                raise ToolError(f"{where}.function.arguments", f"not JSON ({e.msg} at {e.pos})") from None
        if not isinstance(args, dict):
            raise ToolError(
                f"{where}.function.arguments", f"expected a JSON object, got {type(args).__name__}"
            )
        out.append({"type": "function", "function": {"name": fn["name"], "arguments": args}})
    return out


def reply_text(message: dict) -> str:
    """An assistant turn as a reference reply: its content, then each call as <tool_call>{"name": ...,
    "arguments": {...}}</tool_call> (what `calls_in` reads, whatever the template's own format)."""
    calls = message.get("tool_calls") or []
    parts = [message.get("content") or ""] if message.get("content") else []
    for call in calls:
        fn = call["function"]
        body = json.dumps({"name": fn["name"], "arguments": fn["arguments"]}, ensure_ascii=False)
        parts.append(f"<tool_call>\n{body}\n</tool_call>")
    return "\n".join(parts)


def renders_tools(source: str) -> bool:
    """The template reads the definitions and the calls (rather than dropping them silently)."""
    return "tools" in source and "tool_calls" in source


CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


def calls_in(text: str) -> list[tuple[str, Any]] | None:
    """(name, arguments) of each <tool_call>{...}</tool_call> in a reply, or of a reply that is one JSON
    call object; None when the reply holds no call; arguments None when they do not parse."""
    found = CALL.findall(text) or ([text.strip()] if text.strip().startswith("{") else [])
    if not found:
        return None
    out: list[tuple[str, Any]] = []
    for body in found:
        try:
            call = json.loads(body)
        except json.JSONDecodeError:
            out.append(("", None))
            continue
        if not isinstance(call, dict):
            out.append(("", None))
            continue
        args = call.get("arguments", call.get("parameters"))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                args = None
        out.append((str(call.get("name", "")), args if isinstance(args, dict) else None))
    return out


def call_accuracy(prediction: str, reference: str) -> float:
    """1 when the reply makes exactly the reference's calls (same functions in order, arguments that
    parse and are equal), else 0; a reference with no call scores 1 for a reply with none."""
    want, got = calls_in(reference), calls_in(prediction)
    if want is None:
        return float(got is None)
    return float(
        got is not None and len(got) == len(want) and all(g == w for g, w in zip(got, want, strict=True))
    )


def function_accuracy(prediction: str, reference: str) -> float:
    """1 when the reply calls the reference's functions in order (arguments not compared)."""
    want, got = calls_in(reference), calls_in(prediction)
    if want is None:
        return float(got is None)
    return float(got is not None and [n for n, _ in got] == [n for n, _ in want])
