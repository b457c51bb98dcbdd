"""Augmentation: deterministic copies, untouched answers, id bookkeeping, and noise at the asked rate."""

from __future__ import annotations

import re
from collections import Counter
from itertools import pairwise

import pytest

from strop.core.errors import ConfigError
from strop.data.augment import PARAPHRASES, AugmentOptions, augment, is_augmented, original_id
from strop.data.formats import Record


def conv(rid: str, user: str, answer: str, system: str | None = None) -> Record:
    msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    if system is not None:
        msgs.insert(0, {"role": "system", "content": system})
    return Record(rid, messages=tuple(msgs), where=f"train.jsonl:{rid}")


RECORDS = [
    conv("a", "Name three primary colours.", "Red, yellow and blue.", system="Be brief."),
    conv("b", "Summarize the text.\n\nThe cat sat on the mat all afternoon.", "A cat rested on a mat."),
    Record(
        "c",
        messages=(
            {"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And times three?"},
            {"role": "assistant", "content": "12"},
        ),
    ),
    Record("d", text="A plain text document about tides and harbours."),
]


def user_turns(rec: Record) -> list[str]:
    return [m["content"] for m in rec.messages if m["role"] == "user"]


def test_deterministic_and_independent_of_other_records():
    opts = AugmentOptions(copies=3, char_noise=0.05, word_noise=0.1, seed=7)
    assert augment(RECORDS, opts) == augment(RECORDS, opts)
    assert augment(RECORDS, opts) != augment(
        RECORDS, AugmentOptions(copies=3, char_noise=0.05, word_noise=0.1)
    )
    # a record's copies depend on its index, not on what the other records are
    changed = [RECORDS[0], conv("x", "Something else entirely.", "Fine."), *RECORDS[2:]]
    first = [r for r in augment(RECORDS, opts) if original_id(r.id) == "a"]
    assert first == [r for r in augment(changed, opts) if original_id(r.id) == "a"]


def test_originals_first_then_copies_with_ids_and_where():
    out = augment(RECORDS, AugmentOptions(copies=2))
    assert out[: len(RECORDS)] == RECORDS
    copies = out[len(RECORDS) :]
    # plain text without noise is not augmented; every conversation gets two paraphrased copies
    assert [r.id for r in copies] == ["a~aug1", "a~aug2", "b~aug1", "b~aug2", "c~aug1", "c~aug2"]
    by_id = {r.id: r for r in RECORDS}
    assert all(r.where == by_id[original_id(r.id)].where for r in copies)


def test_system_and_assistant_turns_are_byte_identical():
    opts = AugmentOptions(copies=4, char_noise=0.3, word_noise=0.3, seed=1)
    by_id = {r.id: r for r in RECORDS}
    for copy in augment(RECORDS, opts)[len(RECORDS) :]:
        src = by_id[original_id(copy.id)]
        if src.messages is None:
            continue
        assert [m["role"] for m in copy.messages] == [m["role"] for m in src.messages]
        for new, old in zip(copy.messages, src.messages, strict=True):
            if old["role"] != "user":
                assert new == old


def test_original_id_and_is_augmented():
    assert original_id("doc") == "doc" and not is_augmented("doc")
    assert original_id("doc~aug3") == "doc" and is_augmented("doc~aug3")
    assert original_id("doc#2") == "doc" and not is_augmented("doc#2")
    assert original_id("doc~aug12#2") == "doc" and is_augmented("doc~aug12#2")
    assert original_id("train.jsonl:14") == "train.jsonl:14"


def test_paraphrase_keeps_the_instruction_and_only_touches_the_first_user_turn():
    out = augment(RECORDS, AugmentOptions(copies=len(PARAPHRASES)))
    by_id = {r.id: r for r in RECORDS}
    used = set()
    for copy in out[len(RECORDS) :]:
        src = by_id[original_id(copy.id)]
        new, old = user_turns(copy), user_turns(src)
        assert old[0] in new[0] and new[0] != old[0]
        assert new[1:] == old[1:]
        used.add(new[0].replace(old[0], "{x}"))
        assert is_augmented(copy.id)
    assert used == set(PARAPHRASES)  # copies of one record use different templates


def test_word_noise_rate_roughly_matches():
    words = [f"w{i}" for i in range(2000)]  # distinct, so drops and swaps can be counted exactly
    rec = conv("long", " ".join(words), "ok")
    copy = augment([rec], AugmentOptions(copies=1, paraphrase=False, word_noise=0.1))[1]
    out = user_turns(copy)[0].split()
    position = {w: i for i, w in enumerate(words)}
    dropped = len(words) - len(out)
    swapped = sum(position[x] > position[y] for x, y in pairwise(out))
    assert 0.05 <= (dropped + swapped) / len(words) <= 0.15
    assert dropped > 0 and swapped > 0


def test_char_noise_rate_roughly_matches():
    text = "".join(chr(0x4E00 + i) for i in range(2000))  # distinct characters
    copy = augment([Record("t", text=text)], AugmentOptions(paraphrase=False, char_noise=0.1))[1]
    position = {c: i for i, c in enumerate(text)}
    dropped = len(text) - len(copy.text)
    swapped = sum(position[x] > position[y] for x, y in pairwise(copy.text))
    assert 0.05 <= (dropped + swapped) / len(text) <= 0.15


def test_word_noise_reuses_the_original_whitespace():
    text = "Summarize the text below.\n\nOne two three four five six.\n- seven\n- eight\n"
    runs = Counter(re.findall(r"\s+", text))
    for seed in range(20):
        copy = augment([conv("n", text, "ok")], AugmentOptions(paraphrase=False, word_noise=0.5, seed=seed))
        for c in copy[1:]:
            out = user_turns(c)[0]
            assert (
                not Counter(re.findall(r"\s+", out)) - runs
            )  # line breaks move with their slot, never invented
            assert out.endswith("\n") and not out[0].isspace()


def test_noise_never_empties_a_user_turn():
    recs = [conv(str(i), word, "answer") for i, word in enumerate(["Hi", "x", "  why?  ", "ok\n"] * 25)]
    opts = AugmentOptions(copies=5, paraphrase=False, char_noise=0.5, word_noise=0.5)
    copies = augment(recs, opts)[len(recs) :]
    assert copies  # noise this strong changes most of them
    assert all(user_turns(c)[0].strip() for c in copies)


def test_copies_identical_to_the_original_are_skipped():
    rec = conv("s", "Hi", "Hello!")
    assert augment([rec], AugmentOptions(copies=3, paraphrase=False)) == [rec]
    out = augment([rec], AugmentOptions(copies=10, paraphrase=False, word_noise=0.5, seed=3))
    contents = [user_turns(r)[0] for r in out]
    assert len(contents) == len(set(contents))


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"copies": 0}, "data.augment.copies"),
        ({"char_noise": 0.6}, "data.augment.char_noise"),
        ({"word_noise": -0.1}, "data.augment.word_noise"),
    ],
)
def test_bad_options_name_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        AugmentOptions(**kwargs)
