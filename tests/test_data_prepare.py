"""`strop data prepare`: cleaning, dedup before splitting, stratified and grouped deterministic splits,
malformed rows reported (not fatal), PII masking, a manifest whose hashes match, no overwriting."""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter

import pytest

from conftest import write_jsonl
from strop.core.errors import ConfigError, DataError
from strop.data.duplicates import find_duplicates
from strop.data.formats import to_records
from strop.data.prepare import PrepareOptions, clean_text, mask_pii, prepare
from strop.data.read import read_rows

WORDS = [
    f"{a}{b}"
    for a in ("ka", "lo", "mi", "nu", "pe", "ro", "su", "ti")
    for b in ("ba", "do", "fe", "gu", "ho")
]


def sentence(rng: random.Random, n: int = 30) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def qa(i: int, question: str, answer: str, **extra) -> dict:
    return {"id": f"r{i}", "question": question, "answer": answer, **extra}


def out_rows(out, split: str) -> list[dict]:
    path = out / f"{split}.jsonl"
    return (
        [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []
    )


def all_out(out) -> dict[str, list[dict]]:
    return {s: out_rows(out, s) for s in ("train", "validation", "test")}


# ---------------------------------------------------------------- cleaning


def test_clean_text_normalizes_unicode_newlines_controls_and_spaces():
    assert clean_text("Cafe\u0301") == "Café" and len(clean_text("Cafe\u0301")) == 4  # NFC composes
    assert clean_text("a\x00b\x1b[0m\x7fc\u0085d") == "ab[0mcd"  # C0, DEL, C1 controls removed
    assert clean_text("one\r\ntwo\rthree") == "one\ntwo\nthree"
    assert clean_text("  lots   of \t spaces  \n\n tail  ") == "lots of spaces\n\n tail"
    code = "def f(x):\n    if x:\n\treturn   x  \n    \n"
    assert clean_text(code) == "def f(x):\n    if x:\n\treturn x"  # indentation kept, inner runs collapsed
    assert clean_text("tab\tinside") == "tab inside"
    assert clean_text("lone \ud800surrogate") == "lone surrogate"  # invalid Unicode from JSON's "\\ud800"


def test_prepare_cleans_every_string_field_and_keeps_clean_rows_and_schema(tmp_path):
    rows = [
        {
            "id": "a",
            "messages": [
                {"role": "user", "content": "Hi  there\r\n"},
                {"role": "assistant", "content": "Ok\x07"},
            ],
        },
        {
            "id": "b",
            "messages": [{"role": "user", "content": "Clean."}, {"role": "assistant", "content": "Yes."}],
        },
    ]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    m = prepare([str(src)], tmp_path / "out", PrepareOptions(split=(1, 0, 0), dedup="none"))
    got = {r["id"]: r for r in out_rows(tmp_path / "out", "train")}
    assert got["a"]["messages"] == [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Ok"},
    ]
    assert got["b"] == rows[1]  # a clean row comes out unchanged, in its own schema
    assert m["changed"] == {"normalized": 1, "pii_masked": 0}
    assert (
        not (tmp_path / "out" / "validation.jsonl").exists()
        and not (tmp_path / "out" / "test.jsonl").exists()
    )


def test_normalize_false_leaves_text_alone(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "keep   these  spaces"}])
    prepare([str(src)], tmp_path / "out", PrepareOptions(normalize=False, split=(1, 0, 0)))
    assert out_rows(tmp_path / "out", "train") == [{"text": "keep   these  spaces"}]


def test_length_limits_and_rows_emptied_by_cleaning_are_removed_with_reasons(tmp_path):
    rows = [
        qa(0, "Q?", "x" * 5),
        qa(1, "Q?", "y" * 50),
        qa(2, "Q?", "\x00\x01  "),
        qa(3, "Longer question?", "z" * 20),
    ]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    m = prepare([str(src)], tmp_path / "out", PrepareOptions(min_chars=10, max_chars=40, split=(1, 0, 0)))
    reasons = {r["id"]: r["reason"] for r in m["removed"]}
    assert reasons["r0"] == "shorter than min_chars (8 < 10)"  # "Q?\nxxxxx"
    assert reasons["r1"] == "longer than max_chars (53 > 40)"
    assert reasons["r2"].startswith("empty after cleaning (field 'answer'")
    assert [r["id"] for r in out_rows(tmp_path / "out", "train")] == ["r3"]
    assert m["removed_counts"] == {
        "shorter than min_chars": 1,
        "longer than max_chars": 1,
        "empty after cleaning": 1,
    }


# ---------------------------------------------------------------- duplicates


def test_exact_and_near_duplicates_are_removed_naming_the_kept_id(tmp_path):
    rng = random.Random(0)
    story, other = sentence(rng), sentence(rng)
    rows = [
        qa(0, "Tell a story.", story),
        qa(1, "Something else?", other),
        qa(2, "tell a STORY!", story + " "),  # exact after normalization
        qa(3, "Tell a story.", story.rsplit(" ", 1)[0] + " different"),  # last word changed: near
    ]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    m = prepare([str(src)], tmp_path / "out", PrepareOptions(split=(1, 0, 0)))
    reasons = {r["id"]: r["reason"] for r in m["removed"]}
    assert reasons["r2"] == "exact duplicate of r0"
    assert reasons["r3"].startswith("near duplicate of r0 (jaccard 0.")
    assert [r["id"] for r in out_rows(tmp_path / "out", "train")] == ["r0", "r1"]
    assert m["removed"][0]["where"] == f"{src}:3"

    exact = prepare([str(src)], tmp_path / "exact", PrepareOptions(dedup="exact", split=(1, 0, 0)))
    assert [r["id"] for r in exact["removed"]] == ["r2"]
    none = prepare([str(src)], tmp_path / "none", PrepareOptions(dedup="none", split=(1, 0, 0)))
    assert none["removed"] == [] and none["counts"]["train"] == 4


def test_no_duplicate_straddles_splits(tmp_path):
    rng = random.Random(1)
    base = [sentence(rng) for _ in range(60)]
    rows = [qa(i, f"Q{i % 3}", t) for i, t in enumerate(base)]
    rows += [qa(100 + i, f"Q{i % 3}", base[i].upper()) for i in range(0, 60, 3)]  # exact copies
    rows += [
        qa(200 + i, f"Q{i % 3}", base[i].rsplit(" ", 1)[0] + " zz") for i in range(1, 60, 3)
    ]  # near copies
    rng.shuffle(rows)
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    m = prepare([str(src)], tmp_path / "out", PrepareOptions(split=(0.5, 0.25, 0.25)))
    assert m["removed_counts"] == {"exact duplicate": 20, "near duplicate": 20}
    splits = {
        s: to_records(read_rows(str(tmp_path / "out" / f"{s}.jsonl")), "auto", {}, s)[0]
        for s in ("train", "validation", "test")
    }
    d = find_duplicates(splits)
    assert d.exact == [] and d.near == []
    assert sum(len(r) for r in splits.values()) == 60


# ---------------------------------------------------------------- splitting


def test_stratified_split_keeps_label_proportions(tmp_path):
    rows = [
        {"text": f"row {i} " + ("good" if i % 3 else "bad"), "label": "good" if i % 3 else "bad"}
        for i in range(300)
    ]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    m = prepare([str(src)], tmp_path / "out", PrepareOptions())  # "label" present: stratified by default
    assert m["stratified_by"] == "label"
    assert [m["counts"][s] for s in ("train", "validation", "test")] == [240, 30, 30]
    for split, out in all_out(tmp_path / "out").items():
        c = Counter(r["label"] for r in out)
        assert abs(c["good"] - 2 * c["bad"]) <= 1, (split, c)
        assert m["label_counts"][split] == {"bad": c["bad"], "good": c["good"]}


def test_stratify_by_a_named_field_with_uneven_fractions(tmp_path):
    rows = [
        {"text": f"item number {i}", "topic": ["a", "b", "c"][i % 3] if i < 90 else "d"} for i in range(100)
    ]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    m = prepare([str(src)], tmp_path / "out", PrepareOptions(stratify="topic", split=(0.7, 0.2, 0.1)))
    sizes = {"a": 30, "b": 30, "c": 30, "d": 10}
    for split, frac in zip(("train", "validation", "test"), (0.7, 0.2, 0.1), strict=True):
        for topic, n in sizes.items():
            assert abs(m["label_counts"][split][topic] - n * frac) < 1.5, (split, topic)


def test_group_by_keeps_groups_together(tmp_path):
    rng = random.Random(2)
    rows = [
        {"text": sentence(rng, 12), "user": f"user{g}@example.com"}
        for g in range(40)
        for _ in range(g % 4 + 1)
    ]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    m = prepare([str(src)], tmp_path / "out", PrepareOptions(group_by="user", mask_pii=True))
    assert m["grouped_by"] == "user" and "stratified_by" not in m
    where: dict[str, set] = {}
    for split, out in all_out(tmp_path / "out").items():
        for r in out:
            where.setdefault(r["text"], set()).add(split)
    side = {}
    for r in rows:  # groups are read before masking: the e-mail key still separates users
        side.setdefault(r["user"], set()).update(where[r["text"]])
    assert all(len(s) == 1 for s in side.values())
    assert sum(m["group_counts"].values()) == 40 and all(m["group_counts"][s] > 0 for s in m["group_counts"])
    assert {r["user"] for r in out_rows(tmp_path / "out", "train")} == {"[EMAIL]"}


def test_stratify_and_group_by_together_are_refused():
    with pytest.raises(ConfigError, match="stratify and group_by: choose one"):
        PrepareOptions(stratify="label", group_by="user")


def test_same_seed_same_bytes_other_seed_other_split(tmp_path):
    rows = [{"text": f"sample text number {i}", "label": i % 2} for i in range(50)]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    prepare([str(src)], tmp_path / "a", PrepareOptions(seed=7))
    prepare([str(src)], tmp_path / "b", PrepareOptions(seed=7))
    prepare([str(src)], tmp_path / "c", PrepareOptions(seed=8))
    for name in ("train.jsonl", "validation.jsonl", "test.jsonl", "manifest.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert out_rows(tmp_path / "a", "test") != out_rows(tmp_path / "c", "test")


# ---------------------------------------------------------------- malformed rows, inputs, manifest


def test_malformed_rows_are_reported_with_file_line_and_not_fatal(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(
        json.dumps(qa(0, "Fine?", "Yes."))
        + "\n\n"
        + json.dumps({"id": "r1", "question": "No answer?"})
        + "\n"
        + json.dumps(qa(2, "Number?", 42))
        + "\n{not json\n"
    )
    csv = tmp_path / "more.csv"
    csv.write_text("question,answer\nWhat is 2+2?,4\nEmpty?,\n")
    m = prepare([str(src), str(csv)], tmp_path / "out", PrepareOptions(split=(1, 0, 0)))
    unparsable = m["removed"][2]["reason"]
    assert unparsable.startswith("malformed: invalid JSON (") and unparsable.endswith("column 2)")
    assert m["removed"] == [
        {"where": f"{src}:3", "id": "r1", "reason": "malformed: field 'answer': missing"},
        {"where": f"{src}:4", "id": "r2", "reason": "malformed: field 'answer': expected a string, got int"},
        {"where": f"{src}:5", "id": f"{src}:5", "reason": unparsable},
        {
            "where": f"{csv}:3",
            "id": f"{csv}:3",
            "reason": "malformed: field 'answer': empty or whitespace-only",
        },
    ]
    assert m["removed_counts"] == {"malformed": 4}
    assert [(i["rows"], i["format"]) for i in m["inputs"]] == [(4, "question_answer"), (2, "question_answer")]
    assert out_rows(tmp_path / "out", "train") == [
        qa(0, "Fine?", "Yes."),
        {"question": "What is 2+2?", "answer": "4"},
    ]


def test_all_rows_malformed_or_undetectable_format_is_an_error(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "Q?"}, {"question": "R?", "answer": ""}])
    with pytest.raises(DataError, match="no rows left after cleaning"):
        prepare([str(bad)], tmp_path / "out", PrepareOptions(), fmt="question_answer")
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"foo": "bar"}])
    with pytest.raises(DataError, match="cannot detect the data format"):
        prepare([str(odd)], tmp_path / "out", PrepareOptions())
    assert not (tmp_path / "out").exists()


def test_fields_mapping_is_used_and_kept_in_the_manifest(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"q": "Why?", "a": "Because."}, {"q": "How?", "a": "So."}])
    m = prepare(
        [str(src)], tmp_path / "out", PrepareOptions(split=(1, 0, 0)), fields={"question": "q", "answer": "a"}
    )
    assert m["fields"] == {"question": "q", "answer": "a"} and m["counts"]["train"] == 2
    assert out_rows(tmp_path / "out", "train")[0] == {"q": "Why?", "a": "Because."}


def test_manifest_hashes_match_the_written_files(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": f"line {i} of the file"} for i in range(20)])
    m = prepare([str(src)], tmp_path / "out", PrepareOptions())
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == m
    assert m["inputs"] == [
        {
            "path": str(src),
            "format": "text",
            "rows": 20,
            "sha256": hashlib.sha256(src.read_bytes()).hexdigest(),
        }
    ]
    assert m["counts"] == {"read": 20, "kept": 20, "removed": 0, "train": 16, "validation": 2, "test": 2}
    for split, o in m["outputs"].items():
        data = (tmp_path / "out" / o["file"]).read_bytes()
        assert (
            hashlib.sha256(data).hexdigest() == o["sha256"]
            and data.count(b"\n") == o["rows"] == m["counts"][split]
        )
    assert m["options"]["split"] == [0.8, 0.1, 0.1] and m["options"]["dedup"] == "near"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "manifest.json",
        "test.jsonl",
        "train.jsonl",
        "validation.jsonl",
    ]


def test_refuses_to_overwrite_unless_forced(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "first"}, {"text": "second"}])
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty; pass --force to replace it"):
        prepare([str(src)], out, PrepareOptions(split=(1, 0, 0)))
    assert (out / "notes.txt").read_text() == "mine"
    prepare([str(src)], out, PrepareOptions(split=(1, 0, 0)), force=True)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "train.jsonl"]
    (tmp_path / "data").mkdir()
    inside = write_jsonl(tmp_path / "data" / "in.jsonl", [{"text": "x"}])
    with pytest.raises(DataError, match="holds the input"):
        prepare([str(inside)], tmp_path / "data", PrepareOptions(), force=True)
    assert inside.exists()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"dedup": "fuzzy"}, "dedup: expected one of none, exact, near; got 'fuzzy'"),
        ({"split": (0.8, 0.1)}, "split: expected three fractions"),
        ({"split": (0.9, 0.2, -0.1)}, "split: expected three fractions >= 0"),
        ({"split": (0.8, 0.1, 0.2)}, "split: fractions must sum to 1"),
        ({"near_threshold": 1.0}, "near_threshold: expected a number in"),
        ({"min_chars": 10, "max_chars": 5}, "min_chars/max_chars"),
    ],
)
def test_bad_options_name_the_option(options, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        PrepareOptions(**options)


# ---------------------------------------------------------------- PII


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("Mail jane.doe+ml@example.co.uk today.", "Mail [EMAIL] today."),
        ("Call +1 415-555-0134 now", "Call [PHONE] now"),
        ("Call (415) 555-0134.", "Call [PHONE]."),
        ("office: 415.555.0134, fax 415-555-0199", "office: [PHONE], fax [PHONE]"),
        ("London 020 7946 0958", "London [PHONE]"),
        ("Ring +44 20 7946 0958 or +49 30 12345678", "Ring [PHONE] or [PHONE]"),
    ],
)
def test_mask_pii_finds_emails_and_phone_numbers(text, masked):
    assert mask_pii(text) == masked


@pytest.mark.parametrize(
    "text",
    [
        "In 2024 the price rose from $1,299.99 to $1,499.00.",
        "Natalia sold 48/2 = <<48/2=24>>24 clips in May. 48+24 = <<48+24=72>>72",
        "<<3*4=12>>12 and 1200 - 300 = 900 and 1,000,000 people",
        "Dates 2024-01-15 and 15.01.2024 at 12:30, pi is 3.14159265",
        "Version 1.2.3 at 192.168.1.1, ISBN 978-0-306-40615-7, order #12345678",
        "The sum 415 - 555 - 0134 is negative.",
        "user@localhost and @handle",
        "pi = 3.141 592 6535 8979 and the serial 7415-555-0134",
        "Changes: +5 10 15 points",
    ],
)
def test_mask_pii_leaves_numbers_that_are_not_phones(text):
    assert mask_pii(text) == text


def test_masking_is_counted_in_the_manifest(tmp_path):
    rows = [qa(0, "Who?", "Write to bob@example.org or call (415) 555-0134."), qa(1, "Sum?", "48/2 = 24")]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    m = prepare([str(src)], tmp_path / "out", PrepareOptions(mask_pii=True, split=(1, 0, 0)))
    assert m["changed"] == {"normalized": 0, "pii_masked": 1}
    assert [r["answer"] for r in out_rows(tmp_path / "out", "train")] == [
        "Write to [EMAIL] or call [PHONE].",
        "48/2 = 24",
    ]


def test_a_folder_is_read_file_by_file_each_with_its_own_format(tmp_path):
    (tmp_path / "data").mkdir()
    a = write_jsonl(tmp_path / "data" / "a.jsonl", [qa(0, "Why?", "Because.")])
    b = write_jsonl(tmp_path / "data" / "b.jsonl", [{"instruction": "Say hi.", "output": "Hi."}])
    m = prepare([str(tmp_path / "data")], tmp_path / "out", PrepareOptions(split=(1, 0, 0)))
    assert [(i["path"], i["format"], i["rows"]) for i in m["inputs"]] == [
        (str(a), "question_answer", 1),
        (str(b), "alpaca", 1),
    ]
    assert out_rows(tmp_path / "out", "train") == [
        qa(0, "Why?", "Because."),
        {"instruction": "Say hi.", "output": "Hi."},
    ]


def test_preference_pairs_differing_only_in_the_rejected_reply_are_not_duplicates(tmp_path):
    rows = [
        {"prompt": "Pick a colour.", "chosen": "Blue.", "rejected": "No."},
        {"prompt": "Pick a colour.", "chosen": "Blue.", "rejected": "I will not."},
        {"prompt": "Pick a colour.", "chosen": "Blue.", "rejected": "No!"},  # exact copy of the first
    ]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    m = prepare([str(src)], tmp_path / "out", PrepareOptions(split=(1, 0, 0)))
    assert [r["reason"] for r in m["removed"]] == [f"exact duplicate of {src}:1"]
    assert out_rows(tmp_path / "out", "train") == rows[:2]
