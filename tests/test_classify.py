"""Sequence classification: head-only trains only the head, saved classifiers reload to the same
predictions with their labels, metrics and class weights match hand-computed values, pooling ignores
padding, bad labels are named, and `strop predict` / `strop explain` work on a run."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from conftest import tiny_config, write_jsonl
from strop.core.errors import DataError
from strop.data.classes import class_weights
from strop.eval.classification import classification_metrics
from strop.models.classifier import load_classifier
from strop.recipes.classify import train_classifier
from strop.training.loop import fit as loop_fit

WORDS = {
    "sea": ["sea", "wide", "blue", "deep", "poem"],
    "city": ["capital", "France", "Paris", "French", "Translate"],
}


def labelled_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "sea" if i % 3 else "city"  # 2:1, so class weights matter
        words = rng.choices(WORDS[label], k=4) + rng.choices(["the", "is", "and", "of"], k=2)
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return rows


def config(model_dir, tmp_path, method="head", **sections):
    data = write_jsonl(tmp_path / "train.jsonl", labelled_rows(60))
    cfg = tiny_config(model_dir, data, tmp_path / "out", task="classification", **sections)
    cfg["method"] = {"name": method, "lora": {"r": 4, "alpha": 8}, "freeze": {"train_last_n_blocks": 1}}
    cfg["optim"] = {"lr": 5e-2 if method == "head" else 1e-2, "schedule": "constant"}
    cfg["train"] = {"batch_size": 8, "max_steps": 12, "eval_every": 12, "seed": 0}
    cfg["eval"] = {"enabled": True, "max_examples": 16}
    cfg["classify"] = {"explain": 2, **sections.get("classify", {})}
    return cfg


def test_head_only_trains_only_the_head_and_learns(tiny_bert, tmp_path, monkeypatch):

    before = {}
    real = loop_fit

    def spy(model, *args, **kwargs):
        before.update({k: v.detach().clone() for k, v in model.state_dict().items()})
        out = real(model, *args, **kwargs)
        before["__after__"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return out

    monkeypatch.setattr("strop.recipes.skeleton.fit", spy)
    result = train_classifier(config(tiny_bert, tmp_path), show_progress=False)
    after = before.pop("__after__")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("head.") for k in changed), sorted(changed)[:5]
    assert {k for k in before if k.startswith("head.")} == changed  # every head weight moved
    assert result.metrics["val_accuracy"] >= 0.9  # the two word sets are linearly separable
    summary = json.loads((result.run_dir / "eval" / "summary.json").read_text())
    assert summary["labels"] == ["city", "sea"] and summary["metrics"]["accuracy"]["majority"] < 0.8
    assert summary["confusion"]["labels"] == ["city", "sea"]
    assert sum(map(sum, summary["confusion"]["matrix"])) == summary["examples"]
    explained = summary["explanations"][0]
    assert len(explained["tokens"]) == len(explained["attributions"]) and explained["predicted"] in (
        "city",
        "sea",
    )
    assert not (result.model_dir / "model.safetensors").exists()  # a frozen backbone is the base's: not saved
    html = (result.run_dir / "report.html").read_text()
    assert "Confusion matrix" in html and "Token attributions" in html and "majority-label baseline" in html


@pytest.mark.parametrize(
    ("arch", "method"), [("bert", "lora"), ("bert", "full"), ("llama", "lora"), ("llama", "freeze")]
)
def test_saved_classifier_reloads_to_the_same_predictions(tiny_bert, tiny_llama, tmp_path, arch, method):
    model_dir = tiny_bert if arch == "bert" else tiny_llama
    result = train_classifier(config(model_dir, tmp_path, method), show_progress=False)
    meta = json.loads((result.model_dir / "strop_model.json").read_text())
    assert meta["task"] == "classification" and meta["labels"] == ["city", "sea"]
    clf = load_classifier(result.model_dir, meta["base_model"], torch.device("cpu"), torch.float32)
    assert clf.labels == ["city", "sea"] and clf.pooling == ("mean" if arch == "bert" else "last")
    rows = [json.loads(x) for x in (result.run_dir / "eval" / "predictions.jsonl").read_text().splitlines()]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(result.model_dir)
    texts = [r["text"] for r in labelled_rows(60)]
    by_id = {f"{tmp_path / 'train.jsonl'}:{i + 1}": t for i, t in enumerate(texts)}
    for row in rows[:4]:
        enc = tok(by_id[row["id"]], return_tensors="pt")
        with torch.no_grad():
            probs = clf(**enc).softmax(-1)[0]
        saved = torch.tensor([row["probabilities"][name] for name in clf.labels])
        assert torch.allclose(probs, saved, atol=1e-5)
        assert clf.labels[int(probs.argmax())] == row["predicted"]


def test_last_token_pooling_ignores_right_padding(tiny_llama, tmp_path):
    from strop.models.classifier import SequenceClassifier, load_backbone

    clf = SequenceClassifier(
        load_backbone(str(tiny_llama), torch.device("cpu"), torch.float32), ["a", "b"], "last", [8], 0.0
    ).eval()
    short = torch.tensor([[5, 6, 7]])
    padded = torch.tensor([[5, 6, 7, 0, 0], [5, 6, 7, 8, 9]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        alone = clf(input_ids=short, attention_mask=torch.ones_like(short))
        batch = clf(input_ids=padded, attention_mask=mask)
    assert torch.allclose(alone[0], batch[0], atol=1e-5) and not torch.allclose(batch[0], batch[1], atol=1e-4)


def test_metrics_match_hand_computed_values():
    # true:  a a a b b c ; pred: a a b b c c
    m = classification_metrics([0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 2, 2], 3, ["a", "b", "c"])
    assert m["confusion"]["matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    pa, ra = 2 / 2, 2 / 3
    pb, rb = 1 / 2, 1 / 2
    pc, rc = 1 / 2, 1 / 1
    f1 = [2 * p * r / (p + r) for p, r in ((pa, ra), (pb, rb), (pc, rc))]
    assert m["macro_f1"] == pytest.approx(sum(f1) / 3)
    assert m["per_class"]["a"] == pytest.approx({"precision": pa, "recall": ra, "f1": f1[0], "support": 3})
    never = classification_metrics([0, 1], [0, 0], 2)  # class 1 never predicted: precision 0, not NaN
    assert never["per_class"]["1"]["precision"] == 0.0 and never["macro_f1"] == pytest.approx((2 / 3 + 0) / 2)


def test_balanced_class_weights_are_n_over_k_times_count():
    assert class_weights([0, 0, 0, 1], ["a", "b"], "balanced") == pytest.approx([4 / (2 * 3), 4 / (2 * 1)])
    assert class_weights([0, 1], ["a", "b"], {"b": 3.0}) == [1.0, 3.0]
    assert class_weights([0, 1], ["a", "b"], "none") is None
    with pytest.raises(DataError, match="unknown label"):
        class_weights([0, 1], ["a", "b"], {"c": 2.0})


def test_a_validation_label_unseen_in_training_is_named(tiny_bert, tmp_path):
    cfg = config(tiny_bert, tmp_path)
    val = write_jsonl(
        tmp_path / "val.jsonl", [{"text": "sea wide", "label": "sea"}, {"text": "x", "label": "sky"}]
    )
    cfg["data"]["validation"] = [str(val)]
    with pytest.raises(DataError, match=r"val\.jsonl:2 'sky'"):
        train_classifier(cfg, show_progress=False)


def test_text_pairs_are_encoded_as_pairs(tiny_bert, tmp_path):
    from transformers import AutoTokenizer

    from strop.core.config import DatasetSource
    from strop.data.build import read_records
    from strop.data.classes import encode

    path = write_jsonl(
        tmp_path / "pairs.jsonl", [{"text": "the sea", "text_pair": "is blue", "label": "yes"}]
    )
    rec = read_records(DatasetSource(path=str(path)))[0]
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    ts = encode([rec], tok, {"yes": 0}, 64)
    assert ts.ids[0].tolist() == tok("the sea", "is blue")["input_ids"] and ts.targets == [0]


def test_predict_and_explain_from_the_cli(tiny_bert, tmp_path, capsys):
    from strop.cli.main import main

    result = train_classifier(config(tiny_bert, tmp_path), show_progress=False)
    src = write_jsonl(tmp_path / "new.jsonl", [{"text": "the sea is deep"}, {"text": "Paris is the capital"}])
    out = tmp_path / "pred.jsonl"
    assert main(["predict", str(result.run_dir), "--file", str(src), "--out", str(out)]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["text"] for r in rows] == ["the sea is deep", "Paris is the capital"]
    assert all(set(r["probabilities"]) == {"city", "sea"} for r in rows)
    assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-4 for r in rows)
    assert all(r["label"] == max(r["probabilities"], key=r["probabilities"].get) for r in rows)

    capsys.readouterr()
    assert main(["explain", str(result.run_dir), "--text", "the sea is deep"]) == 0
    printed = capsys.readouterr().out
    assert "predicted" in printed and "sea" in printed


def test_constrained_label_scoring_picks_the_planted_label(tokenizer):
    from types import SimpleNamespace

    from strop.data.template import ChatTemplate, resolve_template
    from strop.eval.label_scoring import label_logprobs

    template = ChatTemplate(tokenizer, resolve_template("chatml", tokenizer)[1])
    labels = ["blue", "Paris"]
    ids = {name: tokenizer(name, add_special_tokens=False)["input_ids"] for name in labels}
    assert not set(ids["blue"]) & set(ids["Paris"])

    class Planted(torch.nn.Module):
        """Logits that favour the tokens of one label at every position."""

        def __init__(self, label):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.favoured = ids[label]

        def forward(self, input_ids, attention_mask):
            logits = torch.zeros(*input_ids.shape, len(tokenizer))
            logits[..., self.favoured] = 8.0
            return SimpleNamespace(logits=logits)

    prompts = [[{"role": "user", "content": f"colour of the sea {i}?"}] for i in range(3)]
    for planted in labels:
        scores = label_logprobs(Planted(planted), template, prompts, labels, batch_size=4)
        assert scores.shape == (3, 2) and torch.isfinite(scores).all()
        assert [labels[j] for j in scores.argmax(-1).tolist()] == [planted] * 3
    shots = [{"role": "user", "content": "sky?"}, {"role": "assistant", "content": "Paris"}]
    with_shots = label_logprobs(Planted("blue"), template, prompts, labels, shots=shots)
    assert torch.allclose(
        with_shots, label_logprobs(Planted("blue"), template, prompts, labels)
    )  # shots are context only


def test_sft_on_labelled_rows_reports_constrained_label_accuracy(tiny_llama, tmp_path):
    from strop.recipes.run import train

    data = write_jsonl(tmp_path / "train.jsonl", labelled_rows(40))
    cfg = tiny_config(tiny_llama, data, tmp_path / "out")
    cfg["eval"] = {
        "enabled": True,
        "max_examples": 6,
        "max_new_tokens": 4,
        "forgetting": False,
        "bootstrap": 100,
        "kshot": 2,
    }
    result = train(cfg, show_progress=False)
    summary = json.loads((result.run_dir / "eval" / "summary.json").read_text())
    assert summary["primary_metric"] == "label_accuracy" and summary["labels"] == ["city", "sea"]
    assert "on label_accuracy" in (result.run_dir / "report.md").read_text()  # the headline's metric
    row = summary["metrics"]["label_accuracy"]
    assert {"base", "tuned", "kshot", "diff", "ci95", "kshot_diff"} <= set(row)
    samples = [json.loads(x) for x in (result.run_dir / "eval" / "samples.jsonl").read_text().splitlines()]
    refs = [s["reference"] for s in samples]
    for name in ("base", "tuned", "kshot"):
        picks = summary["label_predictions"][name]
        assert set(picks) <= {"city", "sea"}
        assert row[name] == pytest.approx(sum(p == r for p, r in zip(picks, refs, strict=True)) / len(refs))


def test_a_classifier_distils_from_a_teacher_classifier(tiny_bert, tmp_path, monkeypatch):
    from strop.methods import distill
    from strop.recipes import classify as recipe

    (tmp_path / "t").mkdir()
    (tmp_path / "s").mkdir()
    teacher = train_classifier(config(tiny_bert, tmp_path / "t", "full"), show_progress=False)
    cfg = config(tiny_bert, tmp_path / "s", "head", model={"name": str(tiny_bert), "keep_layers": 1})
    cfg["distill"] = {"teacher": str(teacher.run_dir), "temperature": 3.0, "alpha": 0.5}
    used = []
    real = distill.classifier_loss

    def spy(model, batch, teacher, temperature, alpha, weights=None):
        used.append((type(teacher).__name__, temperature, alpha))
        return real(model, batch, teacher, temperature, alpha, weights)

    monkeypatch.setattr(recipe.distill, "classifier_loss", spy)
    student = train_classifier(cfg, show_progress=False)
    assert used and used[0] == ("SequenceClassifier", 3.0, 0.5)
    assert student.metrics["val_accuracy"] >= 0.9
    clf = load_classifier(student.model_dir, str(tiny_bert), torch.device("cpu"), torch.float32)
    assert len(clf.backbone.encoder.layer) == 1  # the student keeps one block

    cfg["classify"]["labels"] = ["sea", "city"]  # a teacher with other labels (order) is refused
    cfg["name"] = "other-labels"  # a new run: the finished one above is never rerun
    from strop.core.errors import ConfigError

    with pytest.raises(ConfigError, match="labels"):
        train_classifier(cfg, show_progress=False)


def test_classifier_kd_loss_by_hand():
    from strop.methods import distill

    class Fixed(torch.nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.logits = logits

        def forward(self, input_ids, attention_mask):
            return self.logits

    s = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[1.0, 1.0], [0.0, 3.0]])
    batch = {
        "input_ids": torch.zeros(2, 3, dtype=torch.long),
        "attention_mask": torch.ones(2, 3),
        "class_labels": torch.tensor([0, 1]),
    }
    T, alpha = 2.0, 0.25
    soft = 0.0
    for srow, trow in zip(s.tolist(), t.tolist(), strict=True):
        ps = [math.exp(x / T) / sum(math.exp(y / T) for y in srow) for x in srow]
        pt = [math.exp(x / T) / sum(math.exp(y / T) for y in trow) for x in trow]
        soft += T * T * sum(p * math.log(p / q) for p, q in zip(pt, ps, strict=True))
    hard = -math.log(math.exp(2) / (math.exp(2) + 1)) - math.log(math.exp(1) / (1 + math.exp(1)))
    got, n = distill.classifier_loss(Fixed(s), batch, Fixed(t), T, alpha)
    assert n == 2 and got.item() == pytest.approx(alpha * soft + (1 - alpha) * hard, rel=1e-6)


def test_cached_features_give_the_backbones_logits_and_skip_it(tiny_bert):
    from strop.models.classifier import SequenceClassifier, load_backbone

    clf = SequenceClassifier(
        load_backbone(str(tiny_bert), torch.device("cpu"), torch.float32), ["a", "b"], "mean", [8], 0.0
    )
    clf.backbone.requires_grad_(False)
    clf.eval()
    rows = [[5, 6, 7], [8, 9, 10, 11, 12], [13, 14]]
    ids = torch.tensor([[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        direct = clf(input_ids=ids, attention_mask=mask)
    clf.cache_features(rows, pad_id=0, batch_size=2)
    calls = []
    clf.backbone.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        cached = clf(input_ids=ids, attention_mask=mask)
        clf(
            input_ids=torch.tensor([[20, 21]]), attention_mask=torch.ones(1, 2, dtype=torch.long)
        )  # not cached
    assert torch.allclose(direct, cached, atol=1e-5) and calls == [1]  # only the unseen text ran the backbone


def test_skip_bad_rows_applies_to_classification_data(tiny_bert, tmp_path):
    from transformers import AutoTokenizer

    from strop.core.config import DataConfig
    from strop.data.classes import build_labelled

    rows = labelled_rows(10) + [{"text": "bad row", "label": ["sea"]}]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    with pytest.raises(DataError, match=r"bad\.jsonl:11"):
        build_labelled(DataConfig(train=[str(path)], val_fraction=0.0), tok, None, 0)
    data = build_labelled(DataConfig(train=[str(path)], val_fraction=0.0, skip_bad_rows=True), tok, None, 0)
    assert len(data.train) == 10
