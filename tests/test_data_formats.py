"""Reading data files and turning rows into conversations: every format, and every error names file:line."""

from __future__ import annotations

import json

import pytest

from conftest import ALPACA_ROWS, write_jsonl
from strop.core.errors import DataError
from strop.data.formats import detect_format, to_records
from strop.data.read import read_rows

ROWS = ALPACA_ROWS[:3]


def records(path, fmt="auto", fields=None):
    return to_records(read_rows(str(path)), fmt, fields or {}, str(path))


# ---------------------------------------------------------------- reading


def test_jsonl_keeps_rows_in_order_with_their_line_numbers(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n" + json.dumps(ROWS[2]) + "\n")
    rows = read_rows(str(f))
    assert [r.data for r in rows] == ROWS
    assert [r.where for r in rows] == [f"{f}:1", f"{f}:3", f"{f}:4"]  # blank lines still count


@pytest.mark.parametrize("wrap", [False, True], ids=["list", "data-key"])
def test_json_list_or_data_key(tmp_path, wrap):
    f = tmp_path / "d.json"
    f.write_text(json.dumps({"data": ROWS} if wrap else ROWS))
    assert [r.data for r in read_rows(str(f))] == ROWS


def test_json_that_is_not_a_list_of_objects_is_rejected(tmp_path):
    f = tmp_path / "d.json"
    f.write_text(json.dumps({"rows": ROWS}))
    with pytest.raises(DataError, match="expected a JSON list"):
        read_rows(str(f))
    f.write_text(json.dumps([ROWS[0], "oops"]))
    with pytest.raises(DataError, match=r"d\.json:row 2: expected a JSON object, got str"):
        read_rows(str(f))


def test_csv_rows_point_at_their_file_line(tmp_path):
    f = tmp_path / "d.csv"
    f.write_text('instruction,output\nHello,"two\nlines"\nBye,ok\n', newline="")
    rows = read_rows(str(f))
    assert [r.data for r in rows] == [
        {"instruction": "Hello", "output": "two\nlines"},
        {"instruction": "Bye", "output": "ok"},
    ]
    assert rows[1].where == f"{f}:4"
    recs, fmt = records(f)
    assert fmt == "alpaca" and recs[0].messages[1]["content"] == "two\nlines"


def test_csv_with_excel_byte_order_mark_is_detected(tmp_path):
    f = tmp_path / "d.csv"
    f.write_text("instruction,output\nHello,World\n", encoding="utf-8-sig")
    recs, fmt = records(f)
    assert fmt == "alpaca" and recs[0].messages[0]["content"] == "Hello"


def test_csv_row_with_more_values_than_columns_is_an_error(tmp_path):
    f = tmp_path / "d.csv"
    f.write_text("instruction,output\nHello,World\nHi,there,extra\n")
    with pytest.raises(DataError, match="more values than the 2 header columns") as e:
        read_rows(str(f))
    assert f"{f}:3:" in str(e.value)


def test_jsonl_and_json_with_byte_order_mark(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8-sig")
    assert [r.data for r in read_rows(str(f))] == ROWS
    g = tmp_path / "d.json"
    g.write_text(json.dumps(ROWS), encoding="utf-8-sig")
    assert [r.data for r in read_rows(str(g))] == ROWS


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    f = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), f)
    rows = read_rows(str(f))
    assert [r.data for r in rows] == ROWS
    assert rows[2].where == f"{f}:row 3"


def test_folder_reads_every_data_file_sorted_and_skips_others(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", ROWS[1:])
    write_jsonl(tmp_path / "a.jsonl", ROWS[:1])
    (tmp_path / "notes.txt").write_text("not data")
    assert [r.data for r in read_rows(str(tmp_path))] == ROWS
    assert [r.data for r in read_rows(str(tmp_path), limit=2)] == ROWS[:2]


def test_empty_folder_is_an_error(tmp_path):
    (tmp_path / "notes.txt").write_text("not data")
    with pytest.raises(DataError, match="no .* files"):
        read_rows(str(tmp_path))


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope" / "train.jsonl"
    with pytest.raises(DataError, match="not found") as e:
        read_rows(str(missing))
    assert str(missing) in str(e.value)


def test_invalid_json_line_names_the_exact_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(
        json.dumps(ROWS[0])
        + "\n\n"
        + json.dumps(ROWS[1])
        + "\n"
        + '{"instruction": "x", "output": }\n'
        + json.dumps(ROWS[2])
        + "\n"
    )
    with pytest.raises(DataError, match="invalid JSON") as e:
        read_rows(str(f))
    assert f"{f}:4:" in str(e.value)


def test_jsonl_line_that_is_not_an_object(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps(ROWS[0]) + "\n[1, 2]\n")
    with pytest.raises(DataError, match=rf"{f}:2: expected a JSON object, got list"):
        read_rows(str(f))


def test_invalid_utf8_jsonl_names_file_and_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_bytes(json.dumps(ROWS[0]).encode() + b'\n{"instruction": "caf\xe9", "output": "x"}\n')
    with pytest.raises(DataError, match="UTF-8") as e:
        read_rows(str(f))
    assert f"{f}:2:" in str(e.value)


def test_invalid_utf8_csv_names_file_and_line(tmp_path):
    f = tmp_path / "d.csv"
    f.write_bytes(b"instruction,output\nhi,there\nbad,caf\xe9\n")
    with pytest.raises(DataError, match="UTF-8") as e:
        read_rows(str(f))
    assert f"{f}:3:" in str(e.value)


def test_unsupported_file_type(tmp_path):
    f = tmp_path / "d.txt"
    f.write_text("hello")
    with pytest.raises(DataError, match="unsupported file type"):
        read_rows(str(f))


# ---------------------------------------------------------------- formats

USER_ASSISTANT = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Arr!"}]


@pytest.mark.parametrize(
    "row, fmt",
    [
        ({"instruction": "a", "output": "b"}, "alpaca"),
        ({"instruction": "a", "input": "c", "output": "b"}, "alpaca"),
        ({"messages": USER_ASSISTANT}, "messages"),
        ({"conversations": USER_ASSISTANT}, "messages"),
        ({"conversations": [{"from": "human", "value": "a"}]}, "sharegpt"),
        ({"messages": [{"from": "human", "value": "a"}]}, "sharegpt"),
        ({"prompt": "a", "completion": "b"}, "prompt_completion"),
        ({"text": "a"}, "text"),
        ({"question": "a", "answer": "b"}, "question_answer"),
        ({"query": "a", "answer": "b"}, None),
        ({"messages": []}, None),
    ],
)
def test_detect_format(row, fmt):
    assert detect_format(row) == fmt


def test_alpaca_without_input(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "What is 2 times 3?", "output": "Arr! 6."}])
    (rec,), fmt = records(f)
    assert fmt == "alpaca" and rec.text is None
    assert list(rec.messages) == [
        {"role": "user", "content": "What is 2 times 3?"},
        {"role": "assistant", "content": "Arr! 6."},
    ]


def test_alpaca_with_input_and_system(tmp_path):
    row = {
        "instruction": "Translate to French.",
        "input": "The sea is blue.",
        "output": "La mer est bleue.",
        "system": "Be a pirate.",
    }
    (rec,), _ = records(write_jsonl(tmp_path / "d.jsonl", [row]))
    roles = [m["role"] for m in rec.messages]
    assert roles == ["system", "user", "assistant"]
    system, user, assistant = (m["content"] for m in rec.messages)
    assert system == "Be a pirate."
    # the instruction comes first, then the input; neither leaks into the response
    assert user.index("Translate to French.") < user.index("The sea is blue.")
    assert assistant == "La mer est bleue."


def test_alpaca_blank_input_and_system_are_ignored(tmp_path):
    row = {"instruction": "Hi", "input": "  ", "output": "Arr!", "system": ""}
    (rec,), _ = records(write_jsonl(tmp_path / "d.jsonl", [row]))
    assert list(rec.messages) == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Arr!"}]


def test_openai_messages(tmp_path):
    conv = [
        {"role": "system", "content": "S"},
        *USER_ASSISTANT,
        {"role": "user", "content": "More?"},
        {"role": "assistant", "content": "Yo ho!"},
    ]
    (rec,), fmt = records(write_jsonl(tmp_path / "d.jsonl", [{"messages": conv, "id": 7}]))
    assert fmt == "messages" and list(rec.messages) == conv and rec.id == "7"


def test_sharegpt_roles_are_mapped(tmp_path):
    conv = [
        {"from": "system", "value": "S"},
        {"from": "human", "value": "Hi?"},
        {"from": "gpt", "value": "Arr!"},
    ]
    (rec,), fmt = records(write_jsonl(tmp_path / "d.jsonl", [{"conversations": conv}]))
    assert fmt == "sharegpt"
    assert list(rec.messages) == [{"role": "system", "content": "S"}, *USER_ASSISTANT]


def test_prompt_completion(tmp_path):
    (rec,), fmt = records(write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Hi?", "completion": "Arr!"}]))
    assert fmt == "prompt_completion" and list(rec.messages) == USER_ASSISTANT


def test_text(tmp_path):
    (rec,), fmt = records(write_jsonl(tmp_path / "d.jsonl", [{"text": "The sea is wide."}]))
    assert fmt == "text" and rec.text == "The sea is wide." and rec.messages is None


def test_record_id_defaults_to_where_the_row_came_from(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", ROWS[:2])
    recs, _ = records(f)
    assert [r.id for r in recs] == [f"{f}:1", f"{f}:2"]


def test_field_mapping(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"query": "Hi?", "answer": "Arr!"}])
    with pytest.raises(DataError, match="cannot detect the data format"):
        records(f)
    (rec,), fmt = records(f, fields={"instruction": "query", "output": "answer"})
    assert fmt == "alpaca" and list(rec.messages) == USER_ASSISTANT
    f2 = write_jsonl(tmp_path / "d2.jsonl", [{"dialog": USER_ASSISTANT}])
    (rec,), fmt = records(f2, fields={"messages": "dialog"})
    assert fmt == "messages" and list(rec.messages) == USER_ASSISTANT


def test_question_answer_rows_are_conversations(tmp_path):
    f = write_jsonl(tmp_path / "gsm.jsonl", [{"question": "Hi?", "answer": "Arr!"}])
    (rec,), fmt = records(f)
    assert fmt == "question_answer" and list(rec.messages) == USER_ASSISTANT


def test_explicit_format_is_used_instead_of_detection(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "Hi?", "output": "Arr!", "text": "ignored"}])
    (rec,), fmt = records(f, fmt="text")
    assert fmt == "text" and rec.text == "ignored"


@pytest.mark.parametrize(
    "row, field, reason",
    [
        ({"instruction": "Hi"}, "output", "missing"),
        ({"instruction": 5, "output": "x"}, "instruction", "expected a string, got int"),
        ({"instruction": "Hi", "output": "  \n"}, "output", "empty"),
        ({"instruction": "Hi", "input": ["x"], "output": "y"}, "input", "expected a string, got list"),
    ],
)
def test_malformed_alpaca_rows_name_file_line_and_field(tmp_path, row, field, reason):
    f = write_jsonl(tmp_path / "d.jsonl", [ROWS[0], ROWS[1], row])
    with pytest.raises(DataError) as e:
        records(f)
    msg = str(e.value)
    assert f"{f}:3: field '{field}'" in msg and reason in msg
    assert f"{f}:1" not in msg and f"{f}:2" not in msg


@pytest.mark.parametrize(
    "conv, field, reason",
    [
        (
            [{"role": "user", "content": "Hi"}, {"role": "pirate", "content": "Arr"}],
            "messages[1].role",
            "unknown role",
        ),
        (
            [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}],
            "messages",
            "no assistant turn",
        ),
        (
            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " "}],
            "messages[1].content",
            "empty",
        ),
        (
            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": 3}],
            "messages[1].content",
            "string",
        ),
        ([{"role": "user", "content": "Hi"}, "Arr"], "messages[1]", "expected an object"),
    ],
)
def test_malformed_conversations_name_file_line_and_field(tmp_path, conv, field, reason):
    f = write_jsonl(tmp_path / "d.jsonl", [{"messages": USER_ASSISTANT}, {"messages": conv}])
    with pytest.raises(DataError) as e:
        records(f)
    assert f"{f}:2: field '{field}'" in str(e.value) and reason in str(e.value)


def test_sharegpt_unknown_role_names_the_from_field(tmp_path):
    conv = [{"from": "human", "value": "Hi"}, {"from": "robot", "value": "Beep"}]
    f = write_jsonl(tmp_path / "d.jsonl", [{"conversations": conv}])
    with pytest.raises(
        DataError, match=r"d\.jsonl:1: field 'conversations\[1\]\.from': unknown role 'robot'"
    ):
        records(f)


def test_all_malformed_rows_are_reported_together(tmp_path):
    bad = [{"instruction": "Hi"}] * 12
    f = write_jsonl(tmp_path / "d.jsonl", [ROWS[0], *bad])
    with pytest.raises(DataError, match="12 malformed row") as e:
        records(f)
    assert f"{f}:2:" in str(e.value) and "and 2 more" in str(e.value)
