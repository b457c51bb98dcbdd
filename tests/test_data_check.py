"""`strop data check`: planted problems are found, with their file:line, field and example ids."""

from __future__ import annotations

import json

from conftest import ALPACA_ROWS, write_jsonl
from strop.cli.main import main

STORY = (
    "The harbour master counted forty ships at dawn, noted the tide tables in his ledger, and sent "
    "the pilot boat out past the breakwater before the fog came in from the western banks"
)


def check(argv: list[str], capsys) -> tuple[int, str]:
    rc = main(["data", "check", *argv])
    return rc, capsys.readouterr().out


def planted(tmp_path):
    rows = [dict(r) for r in ALPACA_ROWS[:12]]
    rows.append({"instruction": "Tell me a story.", "output": STORY})  # line 13
    rows.append(dict(ALPACA_ROWS[0]))  # line 14: exact repeat of line 1
    rows.append({"instruction": "Tell me a story!", "output": STORY.replace("forty", "fifty")})  # 15: near 13
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    with open(train, "a") as f:
        f.write('{"instruction": "broken", "output": \n')  # line 16: invalid JSON
        f.write(json.dumps({"instruction": "no reply"}) + "\n")  # line 17: missing output
        f.write(json.dumps({"instruction": "bell \u0007 here", "output": "ok"}) + "\n")  # 18: control char
        f.write(json.dumps({"instruction": "   ", "output": "ok"}) + "\n")  # 19: whitespace only
    val = write_jsonl(
        tmp_path / "val.jsonl",
        [
            dict(ALPACA_ROWS[3]),  # exact copy of train line 4
            {"instruction": "Tell me a story", "output": STORY.replace("forty", "sixty")},  # near 13
            {"instruction": "How do bees make honey?", "output": "They evaporate nectar and seal it."},
        ],
    )
    return train, val


def test_planted_rows_duplicates_and_leaks_are_found_by_id(tiny_llama, tmp_path, capsys):
    train, val = planted(tmp_path)
    argv = [str(train), "--validation", str(val), "--model", str(tiny_llama), "--max-length", "64"]
    argv += ["--set", f"data.cache_dir={tmp_path / 'cache'}"]
    rc, out = check([*argv, "--json"], capsys)
    assert rc == 0  # errors are reported; only --strict turns them into an exit status
    report = json.loads(out)

    source = report["sources"][0]
    assert source["rows"] == 19 and source["valid"] == 15 and source["format"] == "alpaca"
    rejected = {r["where"].rsplit(":", 1)[1]: r for r in source["rejected_rows"]}
    assert set(rejected) == {"16", "17", "18", "19"}
    assert "invalid JSON" in rejected["16"]["reason"]
    assert rejected["17"]["field"] == "output" and rejected["17"]["reason"] == "missing"
    assert rejected["18"]["field"] == "instruction" and "U+0007" in rejected["18"]["reason"]
    assert rejected["19"]["reason"] == "empty or whitespace-only"

    within = report["duplicates"]["train"]
    assert [f"{train}:1", f"{train}:14"] in within["exact_groups"]
    assert [[a, b] for a, b, _ in within["near_pairs"]] == [[f"{train}:13", f"{train}:15"]]
    leaks = {(v, t, kind) for v, t, kind in report["leakage"]["train_validation"]}
    assert (f"{val}:1", f"{train}:4", "exact") in leaks
    assert (f"{val}:2", f"{train}:13", "near") in leaks or (f"{val}:2", f"{train}:15", "near") in leaks
    assert not any(v == f"{val}:3" for v, _, _ in leaks)  # the honest row is not flagged
    assert any("leakage" in e and "refuse" in e for e in report["errors"])
    assert any("malformed" in e for e in report["errors"])

    est = report["estimate"]
    assert est["steps"] >= 1 and est["train_s"] >= 0 and est["peak_memory_gb"] > 0
    assert 0 <= est["padding_fraction"] < 1

    rc, text = check([*argv, "--strict", "--no-estimate"], capsys)
    assert rc == 1
    assert f"rejected {train}:17: field 'output': missing" in text
    assert "FAIL:" in text and "estimate" not in text


def test_truncation_and_responses_cut_away_are_listed(tiny_llama, tmp_path, capsys):
    rows = [{"id": f"short{i}", "instruction": f"Say hi {i}.", "output": "hi"} for i in range(6)]
    rows.append({"id": "long-prompt", "instruction": "word " * 200, "output": "the answer"})
    rows.append({"id": "long-reply", "instruction": "Talk.", "output": "more words " * 100})
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    argv = [str(train), "--model", str(tiny_llama), "--max-length", "48", "--json", "--no-estimate"]
    argv += ["--set", "data.val_fraction=0", "--set", f"data.cache_dir={tmp_path / 'cache'}"]
    rc, out = check([*argv, "--strict"], capsys)
    report = json.loads(out)
    tokens = report["tokens"]["train"]
    assert tokens["response_cut_away_ids"] == ["long-prompt"]
    assert tokens["truncated_ids"] == ["long-reply"]  # kept, cut short
    assert tokens["max"] == 48 and tokens["examples"] == 7
    assert 0 < tokens["label_tokens"] < tokens["tokens"]
    assert rc == 1 and any("long-prompt" in e for e in report["errors"])


def test_labelled_data_reports_the_label_distribution(tiny_llama, tmp_path, capsys):
    rows = [{"text": f"great film number {i}", "label": "positive"} for i in range(22)]
    rows += [{"text": f"dull film number {i}", "label": "negative"} for i in range(2)]
    train = write_jsonl(tmp_path / "reviews.jsonl", rows)
    argv = [str(train), "--model", str(tiny_llama), "--no-estimate", "--set", "data.val_fraction=0"]
    rc, out = check([*argv, "--set", f"data.cache_dir={tmp_path / 'cache'}"], capsys)
    assert rc == 0
    assert "format labelled (detected)" in out
    assert "labels train: positive 22, negative 2" in out
    assert "labels are imbalanced" in out


def test_a_clean_config_passes_strict(tiny_llama, alpaca_file, tmp_path, capsys):
    import yaml

    from conftest import tiny_config

    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(tiny_llama, alpaca_file, tmp_path / "out")))
    rc, out = check([str(cfg), "--strict", "--no-estimate"], capsys)
    assert rc == 0, out
    assert out.rstrip().endswith("OK: 0 error(s), 0 warning(s)")


def test_data_prepare_from_the_command_line(tmp_path, capsys):
    rows = [
        {"text": f"review number {i} was {'good' if i % 3 else 'bad'}", "label": "pos" if i % 3 else "neg"}
        for i in range(60)
    ]
    rows.append(dict(rows[5]))  # an exact repeat
    src = write_jsonl(tmp_path / "raw.jsonl", rows)
    out = tmp_path / "prepared"
    rc = main(["data", "prepare", str(src), "--out", str(out), "--split", "0.5,0.25,0.25"])
    text = capsys.readouterr().out
    assert rc == 0 and "removed: exact duplicate 1" in text
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["train"] + manifest["counts"]["validation"] + manifest["counts"]["test"] == 60
    assert manifest["label_counts"]["train"] == {"neg": 10, "pos": 20}  # stratified: 1:2 kept
    assert main(["data", "prepare", str(src), "--out", str(out)]) == 2  # no silent overwrite
    assert "--force" in capsys.readouterr().err
    assert main(["data", "prepare", str(src), "--out", str(tmp_path / "x"), "--split", "0.5,0.5"]) == 2


def test_a_missing_file_is_an_error_not_a_report(tmp_path, capsys, monkeypatch):
    import strop.models.load

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded (or its GGUF converted: a minute) before the data was found")

    monkeypatch.setattr(strop.models.load, "resolve_source", no_model)
    rc = main(["data", "check", str(tmp_path / "nope.jsonl"), "--no-estimate"])
    captured = capsys.readouterr()
    assert rc == 2 and f"error: data file not found: {tmp_path / 'nope.jsonl'}" in captured.err
    assert "FAIL" not in captured.out
    config = {"model": {"name": "smollm2-135m-instruct"}, "data": {"train": str(tmp_path / "trian.jsonl")}}
    (tmp_path / "c.yaml").write_text(json.dumps(config))
    rc = main(["train", str(tmp_path / "c.yaml"), "--no-progress"])
    assert rc == 2 and "error: data file not found: " in capsys.readouterr().err


def test_preference_pairs_are_checked_as_training_cuts_them(tiny_llama, tmp_path, capsys):
    """Long prompts are trimmed from their start, so only the pair check speaks of truncation: no
    SFT-style 'would be truncated' warning, a note while the replies are whole, a warning once cut."""
    long = "Human: " + "tell me more about ships " * 20
    rows = [
        {"prompt": f"{long}{i}\n\nAssistant:", "chosen": "The sea.", "rejected": "Paris is a city."}
        for i in range(6)
    ]
    train = write_jsonl(tmp_path / "pairs.jsonl", rows)
    argv = [str(train), "--model", str(tiny_llama), "--set", "task=dpo", "--set", "data.val_fraction=0"]
    rc, out = check([*argv, "--max-length", "96", "--json"], capsys)
    report = json.loads(out)
    assert report["pairs"]["truncated_pairs"] == 6 and report["pairs"]["replies_cut_pairs"] == 0
    assert not report["errors"] and not report["warnings"], report["warnings"]
    assert any("replies are kept whole" in n for n in report["notes"])
    rc, out = check([*argv, "--max-length", "16", "--json"], capsys)
    report = json.loads(out)
    assert report["pairs"]["replies_cut_pairs"] == 6 and not report["errors"]
    assert [w for w in report["warnings"] if "reply cut" in w] == report["warnings"]


def test_the_estimate_counts_every_example_when_max_examples_is_null(
    tiny_llama, alpaca_file, tmp_path, capsys
):
    """eval.max_examples: null means all examples (it crashed the estimate with a TypeError)."""
    argv = [
        str(alpaca_file),
        "--model",
        str(tiny_llama),
        "--json",
        "--set",
        f"data.cache_dir={tmp_path / 'c'}",
    ]
    estimates = []
    for limit in ("null", "1000"):  # more than the held-out examples: the same count as null
        rc, out = check([*argv, "--set", f"eval.max_examples={limit}"], capsys)
        assert rc == 0, out
        estimates.append(json.loads(out)["estimate"]["eval_s"])
    assert estimates[0] == estimates[1] > 0
