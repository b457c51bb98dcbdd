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
