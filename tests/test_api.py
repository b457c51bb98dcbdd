"""The public Python API (strop/api.py): the README's example runs as written, `strop.load` gives the
object a run's task calls for, and what it returns equals what the CLI prints."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

import strop
from conftest import ALPACA_ROWS, run_cli, tiny_config, write_jsonl

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_python_example() -> str:
    section = README.read_text().split("### Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_example_runs_as_written(tiny_llama, tmp_path, monkeypatch, capsys):
    write_jsonl(tmp_path / "train.jsonl", ALPACA_ROWS)
    cfg = tiny_config(tiny_llama, tmp_path / "train.jsonl", tmp_path / "runs")
    cfg["data"]["template"] = "chatml"
    (tmp_path / "my-run.yaml").write_text(yaml.safe_dump(cfg))
    write_jsonl(tmp_path / "my-test.jsonl", [{"prompt": "Name a colour.", "completion": "Blue."}] * 3)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(readme_python_example(), "README.md", "exec"), scope)  # noqa: S102 - our own README
    assert isinstance(scope["lm"], strop.api.LanguageModel)
    replies = scope["lm"].generate(["Say hello like a pirate."], max_new_tokens=16)
    assert len(replies) == 1 and isinstance(replies[0], str)
    assert (scope["merged"] / "config.json").is_file()
    assert scope["scores"]["examples"] == 3 and 0.0 <= scope["scores"]["metrics"]["rouge_l"] <= 1.0
    assert (scope["result"].run_dir / "eval-my-test" / "predictions.jsonl").is_file()


def test_generate_matches_the_cli(tiny_llama, tmp_path, capsys):
    write_jsonl(tmp_path / "train.jsonl", ALPACA_ROWS)
    result = strop.train(
        tiny_config(tiny_llama, tmp_path / "train.jsonl", tmp_path / "runs"), show_progress=False
    )
    ours = strop.load(result.run_dir).generate(["Hello there"], max_new_tokens=8)
    rc, out, err = run_cli(
        ["generate", str(result.run_dir), "--prompt", "Hello there", "--max-new-tokens", "8"], capsys
    )
    assert rc == 0, err
    assert json.loads(out.strip().splitlines()[-1])["response"] == ours[0]


def test_load_gives_a_classifier_for_a_classification_run(tiny_bert, tmp_path, capsys):
    from test_classify import config

    result = strop.train(config(tiny_bert, tmp_path), show_progress=False)
    clf = strop.load(result.run_dir)
    assert isinstance(clf, strop.api.Classifier)
    predictions = clf.predict(["a great film", ("premise", "hypothesis")])
    assert all(p["label"] in clf.labels for p in predictions)
    assert all(sum(p["probabilities"].values()) == pytest.approx(1.0, abs=1e-4) for p in predictions)
    with pytest.raises(strop.api.StropError, match="use predict or score"):
        strop.evaluate(result.run_dir, tmp_path / "x.jsonl")


def test_merge_refuses_a_folder_with_files_unless_forced(tiny_llama, tmp_path):
    from strop.core.errors import StropError

    write_jsonl(tmp_path / "train.jsonl", ALPACA_ROWS)
    result = strop.train(
        tiny_config(tiny_llama, tmp_path / "train.jsonl", tmp_path / "runs"), show_progress=False
    )
    out = tmp_path / "merged"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    lm = strop.load(result.run_dir)
    with pytest.raises(StropError, match=r"out_dir: .*not empty; pass --force"):
        lm.merge(out)
    assert (out / "notes.txt").read_text() == "keep me" and not (out / "config.json").exists()
    assert (lm.merge(out, force=True) / "config.json").is_file()


def test_evaluate_is_what_strop_eval_runs(tiny_llama, tmp_path, capsys):
    """One evaluation path: `strop eval`, `strop.evaluate` and `LanguageModel.evaluate` write the same
    predictions and scores with the same defaults (every example, greedy, 256 new tokens)."""
    rows = [{"question": r["instruction"], "answer": r["output"]} for r in ALPACA_ROWS[:3]]
    data = write_jsonl(tmp_path / "qa.jsonl", rows)
    options = ["--metric", "contains", "--max-new-tokens", "4", "--device", "cpu"]
    rc, _, err = run_cli(
        ["eval", str(tiny_llama), "--data", str(data), "--out", str(tmp_path / "cli"), *options], capsys
    )
    assert rc == 0, err
    api = strop.evaluate(
        tiny_llama, data, tmp_path / "api", device="cpu", metrics=["contains"], max_new_tokens=4
    )
    lm = strop.load(tiny_llama, device="cpu")
    method = lm.evaluate(data, tmp_path / "method", metrics=["contains"], max_new_tokens=4)
    cli = json.loads((tmp_path / "cli" / "summary.json").read_text())
    assert cli["examples"] == api["examples"] == method["examples"] == 3
    assert cli["metrics"] == api["metrics"] == method["metrics"] and cli["loss"] == pytest.approx(api["loss"])
    predictions = {d: (tmp_path / d / "predictions.jsonl").read_text() for d in ("cli", "api", "method")}
    assert predictions["cli"] == predictions["api"] == predictions["method"]


def test_evaluate_refuses_an_output_folder_with_files_unless_forced(tiny_llama, tmp_path):
    from strop.core.errors import StropError

    data = write_jsonl(tmp_path / "qa.jsonl", [{"question": "Name a colour.", "answer": "Blue."}])
    out = tmp_path / "ev"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    lm = strop.load(tiny_llama, device="cpu")
    with pytest.raises(StropError, match=r"out_dir: .*pass --force"):
        lm.evaluate(data, out, max_new_tokens=2)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert lm.evaluate(data, out, max_new_tokens=2, force=True)["examples"] == 1
    assert (out / "notes.txt").read_text() == "keep me" and (out / "summary.json").is_file()
    with pytest.raises(StropError, match="top_k: must be at least 1"):
        lm.evaluate(data, tmp_path / "other", top_k=0)
