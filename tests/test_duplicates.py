"""Exact and near duplicates within and across splits, found by id; unrelated texts are not flagged."""

from __future__ import annotations

import pytest

from strop.core.errors import DataError
from strop.data.duplicates import Example, find_duplicates, normalize
from strop.data.formats import Record

STORY = (
    "The harbour master counted forty ships at dawn, noted the tide tables in his ledger, and sent "
    "the pilot boat out past the breakwater before the fog came in from the western banks"
)


def conv(rid: str, question: str, answer: str) -> Record:
    return Record(
        rid, messages=({"role": "user", "content": question}, {"role": "assistant", "content": answer})
    )


def test_normalize_ignores_case_punctuation_and_space():
    assert normalize("  Hello,   WORLD!\n") == normalize("hello world") == "hello world"
    assert normalize("ﬁne") == "fine"  # NFKC folds the ligature


def test_exact_near_and_leaks_are_found_by_id():
    train = [
        conv("t1", "What is the capital of France?", "Paris."),
        conv("t2", "what is the capital of france", "paris"),  # exact after normalization
        conv("t3", "Tell me a story.", STORY),
        conv("t4", "Name a prime number.", "Seven is prime."),
    ]
    validation = [
        conv("v1", "Tell me a story!", STORY.replace("forty", "fifty")),  # one word changed: near leak
        conv("v2", "Name a prime number", "Seven is prime"),  # exact leak
        conv("v3", "How do bees make honey?", "They evaporate nectar in the hive and seal it with wax."),
    ]
    d = find_duplicates({"train": train, "validation": validation})
    exact_sets = [{(e.split, e.id) for e in g} for g in d.exact]
    assert {("train", "t1"), ("train", "t2")} in exact_sets
    assert {("train", "t4"), ("validation", "v2")} in exact_sets
    near = {(a.id, b.id) for a, b, _ in d.near} | {(b.id, a.id) for a, b, _ in d.near}
    assert ("t3", "v1") in near and all("v3" not in pair for pair in near)
    assert all(sim >= 0.8 for *_, sim in d.near)
    leaks = d.leaks("train", "validation")
    assert {(a.id, b.id, kind) for a, b, kind in leaks} == {("t4", "v2", "exact"), ("t3", "v1", "near")}
    assert d.within("train") == 1 and d.within("validation") == 0


def test_unrelated_texts_are_not_near_duplicates():
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho".split()
    recs = [Record(str(i), text=" ".join(words[i:] + words[:i]) + f" row {i}") for i in range(len(words))]
    d = find_duplicates({"train": recs})
    assert d.exact == [] and all(sim >= 0.8 for *_, sim in d.near)
    assert d.near == []  # rotations share most 3-grams but not 80% of them


@pytest.mark.parametrize("threshold", [0.5, 0.9])
def test_threshold_is_respected(threshold):
    a = Record("a", text=STORY)
    b = Record("b", text=STORY.replace("forty ships", "many boats").replace("western", "northern"))
    d = find_duplicates({"train": [a, b]}, threshold=threshold)
    found = bool(d.near)
    from strop.data.duplicates import shingles

    sim = len(shingles(normalize(STORY)) & shingles(normalize(b.text))) / len(
        shingles(normalize(STORY)) | shingles(normalize(b.text))
    )
    assert found == (sim >= threshold), sim  # sim is 0.68: found at 0.5, not at 0.9
    if found:
        assert {d.near[0][0], d.near[0][1]} == {Example("train", "a"), Example("train", "b")}


def test_a_run_refuses_leakage_into_its_test_set_unless_allowed(tiny_llama, tmp_path, caplog):
    import logging

    import strop.recipes.sft as recipe
    from conftest import ALPACA_ROWS, tiny_config, write_jsonl

    rows = [dict(r) for r in ALPACA_ROWS[:12]] + [{"instruction": "Tell me a story.", "output": STORY}]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    leaked = {"instruction": "Tell me a story!", "output": STORY.replace("forty", "fifty")}
    clean = {
        "instruction": "How do bees make honey?",
        "output": "They evaporate nectar and seal it with wax.",
    }
    test = write_jsonl(tmp_path / "test.jsonl", [leaked, clean])
    cfg = tiny_config(tiny_llama, train, tmp_path / "out", train={"max_steps": 1})
    cfg["data"].update(test=[str(test)], val_fraction=0.0)
    with pytest.raises(
        DataError, match=r"(?s)1 test example\(s\) copy training examples.*allow_leakage"
    ) as err:
        recipe.train(cfg, show_progress=False)
    assert f"{test}:1 ~ {train}:13 (near)" in str(err.value)
    assert not list((tmp_path / "out").rglob("config.yaml"))  # refused before a run was written

    cfg["data"]["allow_leakage"] = True
    with caplog.at_level(logging.WARNING, logger="strop.data"):
        result = recipe.train(cfg, show_progress=False)
    leak = result.data["leakage"]["train_test"]
    assert leak["near"] == 1 and leak["exact"] == 0
    assert leak["pairs"] == [[f"{test}:1", f"{train}:13", "near"]]
    assert any("leakage" in r.message and f"{test}:1" in r.message for r in caplog.records)
    assert "Leakage: 1 test/training pair" in (result.run_dir / "report.md").read_text()


def test_copies_in_a_held_out_validation_split_are_taken_out_not_refused(tiny_llama, tmp_path):
    """Duplicates inside one training file land on both sides of strop's own split: strop removes the
    validation side (the user gave no validation file, so there is nothing to refuse)."""
    import strop.recipes.sft as recipe
    from conftest import ALPACA_ROWS, tiny_config, write_jsonl

    rows = [dict(r) for r in ALPACA_ROWS[:12]]
    for k in range(8):  # near copies of one story: some must fall into the 50% validation split
        rows.append(
            {"instruction": f"Tell me a story{'!' * k}", "output": STORY.replace("forty", f"{40 + k}")}
        )
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = tiny_config(tiny_llama, train, tmp_path / "out", train={"max_steps": 1})
    cfg["data"].update(val_fraction=0.5)
    result = recipe.train(cfg, show_progress=False)
    leak = result.data["leakage"]["train_validation"]
    assert leak["near"] >= 1 and leak["removed_from_validation"] >= 1
    held_out = result.data["validation_examples"]
    assert held_out == round(len(rows) * 0.5) - leak["removed_from_validation"]
