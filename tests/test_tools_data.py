"""Tool-calling data (format `tools`, data/tools.py): rendered with the family's template (`tools=`),
loss on the assistant turns and their calls, tool results and definitions untrained; malformed calls
named by file, line and field; a template that would drop the tools refused; call accuracy by hand;
the shipped example trains and is scored with tool_call / tool_function."""

from __future__ import annotations

import json
from importlib import resources

import pytest

from conftest import build_tokenizer, run_cli, tiny_config, write_jsonl
from strop.core.errors import DataError
from strop.data.formats import to_records
from strop.data.read import Rejected, Row
from strop.data.template import BUILTIN, CHATML, ChatTemplate
from strop.data.tools import call_accuracy, function_accuracy

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
    {"name": "add", "parameters": {"type": "object"}},  # a bare definition is taken too
]


def exchange(arguments='{"city": "Oslo"}', name="get_weather", tool_first=False) -> dict:
    call = {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"function": {"name": name, "arguments": arguments}}],
    }
    turns = [
        {"role": "user", "content": "Weather in Oslo?"},
        call,
        {"role": "tool", "content": '{"temp": 3}'},
    ]
    if tool_first:
        turns = [turns[0], turns[2], turns[1]]
    return {"tools": TOOLS, "messages": [*turns, {"role": "assistant", "content": "3 degrees in Oslo."}]}


def test_a_tool_conversation_trains_the_calls_and_answers_not_the_results_or_definitions():
    records, fmt = to_records([Row(exchange(), "t.jsonl:1")], "auto", {}, "t.jsonl")
    assert fmt == "tools"
    tok = build_tokenizer()
    template = ChatTemplate(tok, BUILTIN["chatml-tools"])
    enc = template.encode(records[0].messages)
    trained = tok.decode([i for i, t in zip(enc.ids, enc.trained, strict=True) if t])
    untrained = tok.decode([i for i, t in zip(enc.ids, enc.trained, strict=True) if not t])
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>' in trained
    assert "3 degrees in Oslo." in trained
    assert '{"temp": 3}' in untrained and '"name": "add"' in untrained and "Weather in Oslo?" in untrained
    assert '{"temp": 3}' not in trained and 'get_weather", "parameters' not in trained
    # inference renders the definitions too: the prompt before the call is what training saw before it
    prompt = template.render(list(records[0].messages[:2]), add_generation_prompt=True)
    assert "<tools>" in prompt and prompt.endswith("<|im_start|>assistant\n")


def test_a_template_without_tools_is_refused_rather_than_dropping_them():
    records, _ = to_records([Row(exchange(), "t.jsonl:1")], "auto", {}, "t.jsonl")
    with pytest.raises(DataError, match="data.template: the chat template renders no tools.*chatml-tools"):
        ChatTemplate(build_tokenizer(), CHATML).encode(records[0].messages)


@pytest.mark.parametrize(
    "row, field, reason",
    [
        (exchange(arguments="{city: Oslo}"), "messages[1].tool_calls[0].function.arguments", "not JSON"),
        (
            exchange(arguments="[1, 2]"),
            "messages[1].tool_calls[0].function.arguments",
            "expected a JSON object",
        ),
        (exchange(name="get_time"), "messages[1].tool_calls[0].function.name", "'get_time', which the row's"),
        (exchange(tool_first=True), "messages[1]", "a tool turn with no tool call before it"),
        ({**exchange(), "tools": []}, "tools", "non-empty list"),
    ],
)
def test_malformed_calls_are_named_by_line_and_field(row, field, reason):
    rejected: list[Rejected] = []
    to_records([Row(row, "t.jsonl:7")], "tools", {}, "t.jsonl", rejected)
    assert len(rejected) == 1 and rejected[0].where == "t.jsonl:7"
    assert rejected[0].field == field and reason in rejected[0].reason


def test_strop_data_check_names_a_bad_call(tiny_llama, tmp_path, capsys):
    import yaml

    data = write_jsonl(tmp_path / "calls.jsonl", [exchange()] * 3 + [exchange(arguments="{oops")])
    cfg = tiny_config(tiny_llama, data, tmp_path / "out")
    cfg["data"].update(template="chatml-tools", max_length=2048)  # the tiny tokenizer is near char-level
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    rc, out, err = run_cli(["data", "check", str(tmp_path / "c.yaml")], capsys)
    said = out + err
    assert rc == 0 and "FAIL: 1 error(s)" in said  # errors are reported; --strict makes them the exit status
    assert "calls.jsonl:4" in said and "messages[1].tool_calls[0].function.arguments" in said


def test_call_accuracy_by_hand():
    ref = '<tool_call>\n{"name": "f", "arguments": {"a": 1, "b": "x"}}\n</tool_call>'
    assert call_accuracy('<tool_call>{"name": "f", "arguments": {"b": "x", "a": 1}}</tool_call>', ref) == 1
    assert (
        call_accuracy('{"name": "f", "arguments": "{\\"a\\": 1, \\"b\\": \\"x\\"}"}', ref) == 1
    )  # bare JSON
    assert call_accuracy('<tool_call>{"name": "f", "arguments": {"a": 2, "b": "x"}}</tool_call>', ref) == 0
    assert function_accuracy('<tool_call>{"name": "f", "arguments": {"a": 2}}</tool_call>', ref) == 1
    assert call_accuracy("<tool_call>{name: f}</tool_call>", ref) == 0  # arguments that do not parse
    assert call_accuracy("It is sunny.", ref) == 0 and function_accuracy("It is sunny.", ref) == 0
    assert call_accuracy("It is sunny.", "Sunny.") == 1  # no call wanted, none made


def test_the_shipped_tools_example_trains_and_is_scored_on_its_calls(tiny_llama, tmp_path):
    from strop.recipes.run import train

    data = resources.files("strop.recipes") / "data"
    rows = [json.loads(x) for x in (data / "tools_test.jsonl").read_text().splitlines()]
    train_rows = [json.loads(x) for x in (data / "tools_train.jsonl").read_text().splitlines()]
    assert {r["messages"][0]["content"] for r in rows}.isdisjoint(
        r["messages"][0]["content"] for r in train_rows
    )
    assert all(r["messages"][-1].get("tool_calls") for r in rows)  # held-out rows end at the call
    cfg = tiny_config(
        tiny_llama,
        data / "tools_train.jsonl",
        tmp_path / "out",
        eval={
            "enabled": True,
            "metrics": ["tool_call", "tool_function"],
            "max_new_tokens": 8,
            "forgetting": False,
            "max_examples": 4,
            "bootstrap": 200,
        },
    )
    cfg["data"].update(template="chatml-tools", max_length=2048, test=[str(data / "tools_test.jsonl")])
    cfg["data"]["train"] = [{"path": str(data / "tools_train.jsonl"), "limit": 8}]
    result = train(cfg, show_progress=False)
    assert result.data["train_examples"] > 0
    assert set(result.eval["metrics"]) == {"tool_call", "tool_function"}
    samples = [json.loads(x) for x in (result.run_dir / "eval" / "samples.jsonl").read_text().splitlines()]
    assert samples[0]["reference"].startswith('<tool_call>\n{"name": ')  # the call is the reference
