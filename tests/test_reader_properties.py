"""Property-based: malformed rows thrown at the reader each give a clear error or are counted as
rejected; nothing crashes; no valid row is changed or lost."""

from __future__ import annotations

import json
from typing import get_args

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from strop.core.config import DatasetSource
from strop.core.errors import DataError
from strop.data.formats import to_records
from strop.data.read import read_rows

FORMATS = [f for f in get_args(DatasetSource.model_fields["format"].annotation) if f != "auto"]
FORMAT_KEYS = ["instruction", "input", "output", "messages", "prompt", "completion", "text", "label"]
FORMAT_KEYS += ["question", "answer", "chosen", "rejected", "role", "content", "id"]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(FORMAT_KEYS), inner, max_size=3)
    ),
    max_leaves=8,
)
turn = st.dictionaries(st.sampled_from(["role", "content", "from", "value"]), json_values, max_size=3)
junk_row = st.one_of(
    st.dictionaries(st.sampled_from(FORMAT_KEYS), json_values, max_size=5),
    # the shapes of real formats with wrong values inside: turns, preference pairs
    st.fixed_dictionaries({"messages": st.lists(turn, max_size=3)}),
    st.fixed_dictionaries({"conversations": st.lists(turn, max_size=3)}),
    st.fixed_dictionaries({"prompt": json_values, "chosen": json_values, "rejected": json_values}),
    st.fixed_dictionaries({"text": json_values, "label": json_values}),
)
# bytes that are not even JSON: truncated objects, bad UTF-8, bare values
junk_line = st.one_of(
    junk_row.map(lambda d: json.dumps(d).encode()),
    junk_row.map(lambda d: json.dumps(d).encode()[:-1]),
    st.binary(min_size=1, max_size=30).filter(lambda b: b.strip() and b"\n" not in b),
    json_values.map(lambda v: json.dumps(v).encode()),
)
clean_text = st.text(
    st.characters(codec="utf-8", exclude_categories=["Cc", "Cs"]), min_size=1, max_size=30
).filter(str.strip)
valid_row = st.fixed_dictionaries({"instruction": clean_text, "output": clean_text})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    valid=st.lists(valid_row, min_size=1, max_size=6), junk=st.lists(junk_line, max_size=6), data=st.data()
)
def test_junk_is_rejected_or_explained_and_valid_rows_survive_unchanged(valid, junk, data, tmp_path):
    lines = [json.dumps(r).encode() for r in valid]
    for line in junk:  # junk goes anywhere, but the first line stays valid so the format is alpaca
        lines.insert(data.draw(st.integers(1, len(lines))), line)
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")

    rejected: list = []
    rows = read_rows(str(path), rejected=rejected)
    records, fmt = to_records(rows, "alpaca", {}, str(path), rejected)
    assert fmt == "alpaca"
    # every non-blank line is either a record or a rejection naming its line
    blank = sum(not line.strip() for line in lines)
    assert len(records) + len(rejected) == len(lines) - blank
    for r in rejected:
        assert r.where.startswith(f"{path}:") and r.reason
    # every valid row comes through exactly as written, in order
    got = [(m[0]["content"], m[1]["content"]) for m in (rec.messages for rec in records)]
    want = [(r["instruction"], r["output"]) for r in valid]
    it = iter(got)
    assert all(any(w == g for g in it) for w in want)

    # strict mode (what training does by default): a clear DataError naming a line, never a crash
    if rejected:
        try:
            to_records(read_rows(str(path)), "alpaca", {}, str(path))
        except DataError as e:
            assert f"{path}:" in str(e)
        else:
            raise AssertionError("malformed rows passed strict reading")


@settings(max_examples=200, deadline=None)
@given(row=junk_row)
def test_any_row_in_any_format_is_a_record_or_a_named_rejection(row):
    from strop.data.read import Row

    for fmt in FORMATS:
        rejected: list = []
        records, _ = to_records([Row(row, "f.jsonl:1")], fmt, {}, "f.jsonl", rejected)
        assert len(records) + len(rejected) == 1
        if rejected:
            assert rejected[0].where == "f.jsonl:1" and rejected[0].reason
        else:  # an accepted record is something a template can render
            rec = records[0]
            assert (rec.text is not None) != (rec.messages is not None)
            for m in rec.messages or ():
                assert isinstance(m["content"], str) and m["role"] in {"system", "user", "assistant", "tool"}
