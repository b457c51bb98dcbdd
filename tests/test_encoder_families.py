"""The encoder side of the family matrix (issue 32): BERT, RoBERTa, DeBERTa-v2 and ModernBERT, each a
tiny random model with a tiny WordPiece or byte-level BPE tokenizer, train a classifier (head only
and full) and a reward model through strop's own recipes: the loss falls, `strop predict` / `strop
score` give what the trained model's own forward gives, and the saved run reloads to equal outputs."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from conftest import run_cli, tiny_config, write_jsonl
from family_models import ENCODERS, save_encoder
from strop.core.metrics import read_metrics
from strop.models.classifier import load_classifier
from strop.models.load import load_tokenizer
from strop.recipes.run import train

NAMES = list(ENCODERS)
WORDS = {"sea": ["sea", "wide", "blue", "deep", "poem"], "city": ["capital", "france", "paris", "french"]}
TEXTS = ["the sea is wide and deep", "paris is the capital of france", "a blue poem", "french capital"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.getbasetemp()
    return {name: save_encoder(e, root / f"encoder-{name}") for name, e in ENCODERS.items()}


def labelled(n: int) -> list[dict]:
    rng = random.Random(0)
    rows = []
    for i in range(n):
        label = "sea" if i % 2 else "city"
        words = rng.choices(WORDS[label], k=4) + rng.choices(["the", "is", "and", "of"], k=2)
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return rows


def capture_fit(monkeypatch) -> dict:
    """The model the run trains, kept after training (its head and backbone as trained)."""
    from strop.recipes import skeleton
    from strop.training.loop import fit

    seen: dict = {}

    def spy(model, *args, **kwargs):
        seen["model"] = model
        return fit(model, *args, **kwargs)

    monkeypatch.setattr(skeleton, "fit", spy)
    monkeypatch.setattr(skeleton, "write_run_report", lambda run_dir: None)  # plots: tested elsewhere
    return seen


def step_losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


def forward(model, tok, texts: list[str]) -> torch.Tensor:
    """The model's outputs (n, labels), one text at a time (no padding)."""
    model.eval()
    with torch.no_grad():
        return torch.cat([model(**tok(t, return_tensors="pt")).float() for t in texts])


@pytest.mark.parametrize("method", ["head", "full"])
@pytest.mark.parametrize("name", NAMES)
def test_a_classifier_trains_predicts_and_reloads(name, method, folders, tmp_path, monkeypatch, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", labelled(20))
    cfg = tiny_config(folders[name], data, tmp_path / "out", task="classification")
    cfg["method"] = {"name": method}
    cfg["optim"] = {"lr": 5e-2 if method == "head" else 1e-2, "schedule": "constant"}
    cfg["train"] = {"batch_size": 16, "max_steps": 4, "seed": 0}  # 16 training rows: one batch, each step
    cfg["classify"] = {"explain": 0}
    seen = capture_fit(monkeypatch)
    result = train(cfg, show_progress=False)
    losses = step_losses(result.run_dir)
    assert len(losses) == 4 and losses[-1] < losses[0], losses

    tok = load_tokenizer(str(result.model_dir))
    trained = forward(seen["model"], tok, TEXTS).softmax(-1)
    meta = json.loads((result.model_dir / "strop_model.json").read_text())
    clf = load_classifier(result.model_dir, meta["base_model"], torch.device("cpu"), torch.float32)
    assert clf.labels == ["city", "sea"] and clf.pooling == "mean"
    assert torch.allclose(forward(clf, tok, TEXTS).softmax(-1), trained, atol=1e-5, rtol=0)

    src = write_jsonl(tmp_path / "new.jsonl", [{"text": t} for t in TEXTS])
    out = tmp_path / "pred.jsonl"
    rc, _, err = run_cli(["predict", str(result.run_dir), "--file", str(src), "--out", str(out)], capsys)
    assert rc == 0, err
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["label"] for r in rows] == [clf.labels[int(i)] for i in trained.argmax(-1)]
    got = torch.tensor([[r["probabilities"][label] for label in clf.labels] for r in rows])
    assert torch.allclose(got, trained, atol=1e-4, rtol=0)


def pairs(n: int) -> list[dict]:
    """The chosen reply always speaks of the sea, the rejected one of Paris."""
    return [
        {
            "prompt": f"Write a short poem {i}.",
            "chosen": "The sea is wide and blue and deep.",
            "rejected": "The capital of France is Paris." + " Paris." * (i % 3),
        }
        for i in range(n)
    ]


@pytest.mark.parametrize("name", NAMES)
def test_a_reward_model_trains_scores_and_reloads(name, folders, tmp_path, monkeypatch, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs(10))
    cfg = tiny_config(folders[name], data, tmp_path / "out", task="reward")
    cfg["data"].update(template="chatml", val_fraction=0.2)
    cfg["method"] = {"name": "full"}
    cfg["optim"] = {"lr": 1e-3, "schedule": "constant"}
    cfg["train"] = {"batch_size": 8, "max_steps": 4, "seed": 0}  # 8 training pairs: one batch, each step
    seen = capture_fit(monkeypatch)
    result = train(cfg, show_progress=False)
    losses = step_losses(result.run_dir)
    assert len(losses) == 4 and losses[-1] < losses[0], losses

    rows = pairs(10)[:3]
    replies = [{"prompt": r["prompt"], "response": r[side]} for r in rows for side in ("chosen", "rejected")]
    scored = tmp_path / "scored.jsonl"
    src = write_jsonl(tmp_path / "replies.jsonl", replies)
    rc, _, err = run_cli(["score", str(result.run_dir), "--file", str(src), "--out", str(scored)], capsys)
    assert rc == 0, err
    rewards = torch.tensor([json.loads(line)["reward"] for line in scored.read_text().splitlines()])

    # the trained model's own forward over the ids the reward run's template gives each conversation
    from strop.methods.reward import RewardScorer

    scorer = RewardScorer(result.run_dir, torch.device("cpu"))
    convs = [
        [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]
        for r in replies
    ]
    ids = [scorer.template.encode(c, last_turn_only=True).ids for c in convs]
    model = seen["model"].eval()
    with torch.no_grad():
        trained = torch.tensor([float(model(input_ids=torch.tensor([x]))[0, 0]) for x in ids])
    assert torch.allclose(rewards, trained, atol=1e-4, rtol=0)
    assert torch.allclose(torch.tensor(scorer(convs)), trained, atol=1e-4, rtol=0)  # reloaded, batched
    assert json.loads((result.model_dir / "classifier.json").read_text())["labels"] == ["reward"]
