"""Preference pairs, the reward model and DPO: pairs share their prompt tokens and mask only the replies,
chunked reply log-probs equal the full-logits reference (values and gradients), DPO starts at exactly
log 2 and raises the preference for planted chosen replies, and a reward model learns to rank them."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import tiny_config, write_jsonl
from strop.core.config import DataConfig, load_config
from strop.core.errors import ConfigError, DataError
from strop.data.batches import IGNORE, collate
from strop.data.pairs import build_pairs, encode_pairs
from strop.data.template import ChatTemplate, resolve_template
from strop.eval.significance import binomial_two_sided, mcnemar
from strop.methods import dpo, logprobs
from strop.methods.preference import sequence_logps
from strop.models.load import load_model
from strop.recipes.run import train
from strop.training.loop import fit as loop_fit


def pairs(n: int) -> list[dict]:
    """The chosen reply always answers about the sea; the rejected one about Paris."""
    return [
        {
            "prompt": f"Write a short poem {i}.",
            "chosen": "The sea is wide and blue and deep.",
            "rejected": "The capital of France is Paris." + " Paris." * (i % 3),
        }
        for i in range(n)
    ]


@pytest.fixture
def template(tokenizer):
    return ChatTemplate(tokenizer, resolve_template("chatml", tokenizer)[1])


def test_pairs_share_the_prompt_and_mask_only_the_replies(tmp_path, template, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", pairs(6))
    data = build_pairs(DataConfig(train=[str(path)], val_fraction=0.0, max_length=64), template, seed=0)
    ts = data.train
    assert len(ts) == 6 and len(ts.rejected) == 6
    c, r = ts.ids[0].tolist(), ts.rejected.ids[0].tolist()
    start = ts.trained[0].tolist().index(True)
    assert c[:start] == r[:start] and ts.rejected.trained[0].tolist().index(True) == start
    assert tokenizer.decode(ts.ids[0][ts.trained[0]]).startswith("The sea is wide")
    b = collate(ts, [0, 1], tokenizer.pad_token_id)
    assert b["input_ids"].shape[0] == 4 and int(b["pairs"]) == 2
    assert torch.equal(
        b["labels"][0][b["labels"][0] != IGNORE], torch.from_numpy(ts.ids[0][ts.trained[0]]).long()
    )

    records = data.records["train"]
    assert encode_pairs(records, template, max_length=2).stats["dropped"] == 6  # replies' first tokens alike
    alike = [{**p, "chosen": "Same words here, again and again: yes.", "rejected": "Same words here, again "
              "and again: no."} for p in pairs(3)]  # fmt: skip
    with pytest.raises(DataError, match="no preference pairs left"):  # nothing differs in the kept window
        build_pairs(
            DataConfig(train=[str(write_jsonl(tmp_path / "a.jsonl", alike))], val_fraction=0.0, max_length=8),
            template,
            seed=0,
        )


def test_long_pairs_lose_the_prompts_oldest_tokens_not_the_replies(tmp_path, template, tokenizer):
    prompt = "Human: " + "tell me more " * 30 + "\n\nAssistant: ok.\n\nHuman: Which one?\n\nAssistant:"
    rows = [{"prompt": prompt, "chosen": " The sea.", "rejected": " Paris, the capital of France."}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    full = encode_pairs(read_pairs(path), template, max_length=4096)
    assert full.stats == {"truncated": 0, "replies_cut": 0, "dropped": 0}
    start = full.trained[0].tolist().index(True)
    assert not full.trained[0][:start].any()  # the earlier assistant turn ("ok.") is prompt, not loss
    assert "ok." in tokenizer.decode(full.ids[0][:start])
    assert template.encode(read_pairs(path)[0].messages).ids == full.ids[0].tolist()  # same tokens as SFT's
    r_reply = full.rejected.ids[0][start:].tolist()

    budget = len(r_reply) + 30  # room for the replies and the prompt's last 30 tokens
    cut = encode_pairs(read_pairs(path), template, max_length=budget)
    assert cut.stats == {"truncated": 1, "replies_cut": 0, "dropped": 0}
    assert cut.rejected.ids[0].tolist() == full.rejected.ids[0][start - 30 :].tolist()  # the prompt's end
    assert cut.ids[0].tolist() == full.ids[0][start - 30 :].tolist()
    assert "Which one?" in tokenizer.decode(cut.ids[0])

    half = encode_pairs(read_pairs(path), template, max_length=12)  # the rejected reply is longer than 6
    assert half.stats == {"truncated": 1, "replies_cut": 1, "dropped": 0}
    assert len(half.rejected.ids[0]) == 12 and half.rejected.trained[0].tolist() == [False] * 6 + [True] * 6
    assert half.rejected.ids[0][6:].tolist() == r_reply[:6]  # the reply keeps its start


def read_pairs(path):
    from strop.core.config import DatasetSource
    from strop.data.pairs import _read

    return _read(DatasetSource(path=str(path)), False)


def test_chunked_reply_logps_equal_full_logits(tiny_llama, template, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(logprobs, "CHUNK", 5)
    path = write_jsonl(tmp_path / "p.jsonl", pairs(4))
    ts = build_pairs(DataConfig(train=[str(path)], val_fraction=0.0, max_length=64), template, seed=0).train
    b = collate(ts, [0, 1, 2], tokenizer.pad_token_id)
    model = load_model(str(tiny_llama), torch.device("cpu"), torch.float32)
    got = dpo.reply_logps(model, b)
    got.sum().backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    want = sequence_logps(logits, b["labels"], b["labels"] != IGNORE)
    want.sum().backward()
    assert torch.allclose(got, want, atol=1e-4)
    for k, p in model.named_parameters():
        assert torch.allclose(grads[k], p.grad, atol=1e-4), k


def dpo_config(model_dir, tmp_path, **extra):
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs(24))
    cfg = tiny_config(model_dir, data, tmp_path / "out", **{"task": "dpo", **extra})
    cfg["data"]["template"] = "chatml"
    cfg["optim"] = {"lr": 2e-2, "schedule": "constant"}
    cfg["train"] = {"batch_size": 4, "max_steps": 8, "eval_every": 4, "seed": 0}
    cfg["eval"] = {"enabled": True}
    return cfg


def test_dpo_starts_at_log_2_and_raises_the_preference(tiny_llama, tmp_path, monkeypatch):

    first = []
    real = loop_fit

    def spy(model, objective, train_set, *args, **kwargs):
        b = objective.collate(train_set, [0, 1, 2, 3], 3)
        s, n, _ = objective.loss(model, b)
        first.append(float(s) / n)
        return real(model, objective, train_set, *args, **kwargs)

    monkeypatch.setattr("strop.recipes.skeleton.fit", spy)
    result = train(dpo_config(tiny_llama, tmp_path), show_progress=False)
    assert first[0] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference before any step
    summary = json.loads((result.run_dir / "eval" / "summary.json").read_text())
    pa = summary["preference_accuracy"]
    # held-out pairs: the chosen reply gained on the rejected one relative to the start, every time
    assert summary["set"] == "validation" and pa["tuned"] >= pa["start"]
    per_token = summary["preference_accuracy_per_token"]
    assert per_token["tuned"] >= per_token["start"]
    n = summary["pairs"]
    assert summary["start_metrics"]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for v in (pa, per_token):  # flips account for the change, and their test is the exact binomial
        assert v["improved"] - v["worsened"] == round((v["tuned"] - v["start"]) * n)
        assert v["p_value"] == pytest.approx(binomial_two_sided(v["improved"], v["worsened"]))
    rows = [json.loads(x) for x in (result.run_dir / "eval" / "pairs.jsonl").open()]
    assert len(rows) == n and all(len(r["start"]) == len(r["tuned"]) == 2 for r in rows)
    assert sum(r["tuned"][0] > r["tuned"][1] for r in rows) == round(pa["tuned"] * n)
    report = (result.run_dir / "report.md").read_text()
    assert "## Preferences (DPO)" in report and "pairs flipped right / wrong" in report
    assert "pairs trained on" in report and "training pairs" in report
    assert summary["metrics"]["reward_accuracy"] == 1.0 and summary["metrics"]["reward_margin"] > 0.1
    assert result.metrics["val_loss"] < math.log(2)
    assert (result.model_dir / "adapter_model.safetensors").is_file()

    steps = [r for r in map(json.loads, (result.run_dir / "metrics.jsonl").open()) if "loss" in r]
    assert steps[0]["reward_margin"] == pytest.approx(0, abs=1e-5)  # the policy is still the reference
    for r in steps:  # per-pair means over the step's pairs
        assert r["reward_margin"] == pytest.approx(r["reward_chosen"] - r["reward_rejected"], abs=1e-6)
        assert r["logps_chosen"] < 0 and r["logps_rejected"] < 0
    assert steps[-1]["reward_accuracy"] == 1.0 and steps[-1]["reward_margin"] > 0.1


def test_simpo_trains_without_a_reference_on_the_training_pairs(tiny_llama, tmp_path, monkeypatch):
    """SimPO is reference-free: no reference pass over the training pairs (the held-out pairs still get
    one, for the start-vs-tuned figures), beta defaults to its own scale, and the policy's per-token
    preference, which SimPO optimises directly, rises on held-out pairs."""
    from strop.recipes import preference as recipe

    passes = []
    real = recipe.reference_logps
    monkeypatch.setattr(recipe, "reference_logps", lambda *a: passes.append(a[-1]) or real(*a))
    cfg = dpo_config(tiny_llama, tmp_path, dpo={"loss": "simpo"})
    result = train(cfg, show_progress=False)
    assert passes == ["validation"]
    assert load_config(cfg).dpo.beta == 2.0
    summary = json.loads((result.run_dir / "eval" / "summary.json").read_text())
    assert summary["objective"] == "simpo"
    per_token = summary["preference_accuracy_per_token"]
    assert per_token["tuned"] == 1.0 and per_token["tuned"] >= per_token["start"]
    assert summary["start_metrics"]["loss"] > summary["metrics"]["loss"]
    assert "loss (simpo)" in (result.run_dir / "report.md").read_text()
    with pytest.raises(ConfigError, match="dpo.simpo_gamma: applies to loss: simpo"):
        load_config(dpo_config(tiny_llama, tmp_path, dpo={"simpo_gamma": 1.0}))


def test_dpo_preference_accuracy_by_sum_and_per_token(monkeypatch):
    from strop.methods import dpo

    x = -100
    batch = {
        "labels": torch.tensor([[x, 1, 1, 1, 1], [x, 1, 1, 1, 1], [x, 1, 1, x, x], [x, 1, 1, x, x]]),
        "pairs": torch.tensor(2),
        "reference": torch.tensor([[-4.0, -3.0], [-1.0, -3.0]]),
    }
    # chosen replies: 4 tokens, log-probs -4 and -1; rejected: 2 tokens, -3 each
    monkeypatch.setattr(dpo, "reply_logps", lambda model, b: torch.tensor([-4.0, -1.0, -3.0, -3.0]))
    m = dpo.DPO().evaluate(torch.nn.Linear(1, 1), [batch])
    assert m["val_preference_accuracy"] == 0.5  # summed: -4 < -3, -1 > -3
    assert m["val_preference_accuracy_per_token"] == 1.0  # means: -1 > -1.5, -0.25 > -1.5
    assert m["val_reward_accuracy"] == 0.0 and m["val_loss"] == pytest.approx(math.log(2))
    ref = np.array([[-4.0, -3.0], [-1.0, -3.0]])
    ipo = dpo.IPO(beta=0.1).summarise(ref, ref, np.array([[4.0, 2.0], [4.0, 2.0]]))
    assert ipo["val_loss"] == pytest.approx(25.0)  # (0 - 1 / (2 * 0.1))^2 when policy = reference


def test_step_metrics_are_means_over_the_step_with_accumulation(tiny_llama, tmp_path):
    """Stats a loss returns are summed over micro-batches and divided by the step's pairs, so a step of
    2 x 2 pairs logs multiples of 1/4, and the same data in one batch of 4 logs the same values."""
    logged = []
    for accum in (1, 2):
        (tmp_path / str(accum)).mkdir()
        cfg = dpo_config(tiny_llama, tmp_path / str(accum))
        cfg["train"] = {"batch_size": 4 // accum, "grad_accum": accum, "max_steps": 3, "seed": 0}
        cfg["eval"] = {"enabled": False}
        run = train(cfg, show_progress=False).run_dir
        logged.append([r for r in map(json.loads, (run / "metrics.jsonl").open()) if "loss" in r])
    for one, two in zip(*logged, strict=True):
        assert (one["reward_accuracy"] * 4) % 1 == 0
        for key in ("loss", "reward_accuracy", "reward_margin", "logps_chosen", "logps_rejected"):
            assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), key


def test_reward_margin_from_the_rows(tmp_path, template, monkeypatch):
    """A pair's `margin` (mapped from any column) shifts the Bradley-Terry loss by hand-derived amounts;
    rows without one use 0; a bad margin names the file, line and field."""
    from strop.core.config import DatasetSource
    from strop.data.pairs import _read
    from strop.methods import reward

    rows = pairs(3)
    rows[0]["gap"], rows[1]["gap"] = 2.0, "0.5"
    path = write_jsonl(tmp_path / "m.jsonl", rows)
    records = _read(DatasetSource(path=str(path), fields={"margin": "gap"}), False)
    ts = encode_pairs(records, template, 64)
    assert ts.margins.tolist() == [2.0, 0.5, 0.0]
    b = collate(ts, [0, 1, 2], 0)
    assert b["margins"].tolist() == [2.0, 0.5, 0.0]
    monkeypatch.setattr(reward, "rewards", lambda m, b: (torch.tensor([1.0, 1.0, 1.0]), torch.zeros(3)))
    s, n, stats = reward.loss(None, b)
    want = sum(math.log1p(math.exp(-(1.0 - m))) for m in (2.0, 0.5, 0.0))  # -logsigmoid(diff - margin)
    assert n == 3 and float(s) == pytest.approx(want, abs=1e-6)
    assert stats == {"accuracy": 3.0, "margin": 3.0}
    assert (
        encode_pairs(
            _read(DatasetSource(path=str(write_jsonl(tmp_path / "n.jsonl", pairs(2)))), False), template, 64
        ).margins
        is None
    )

    rows[2]["gap"] = "wide"
    rows[1]["gap"] = -1
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as e:
        _read(DatasetSource(path=str(path), fields={"margin": "gap"}), False)
    assert "bad.jsonl:2" in str(e.value) and "gap" in str(e.value) and ">= 0" in str(e.value)
    assert "bad.jsonl:3" in str(e.value) and "'wide'" in str(e.value)


def test_mcnemar_exact_against_hand_values():
    assert binomial_two_sided(8, 2) == pytest.approx(2 * (1 + 10 + 45) / 1024)  # C(10, <=2) / 2^10, twice
    assert binomial_two_sided(5, 5) == 1.0 and binomial_two_sided(0, 0) == 1.0
    assert binomial_two_sided(0, 6) == pytest.approx(2 / 64)
    exact = 2 * sum(math.comb(300, i) for i in range(131)) / 2**300
    assert binomial_two_sided(170, 130) == pytest.approx(exact, rel=1e-9)
    assert binomial_two_sided(26000, 24000) < 1e-18  # large sets stay fast and finite
    before = np.array([0, 0, 0, 1, 1, 0], bool)
    after = np.array([1, 1, 0, 1, 0, 0], bool)
    assert mcnemar(before, after) == {"improved": 2, "worsened": 1, "p_value": 1.0}


def test_reward_model_learns_to_rank_and_reloads(tiny_llama, tmp_path):
    from strop.models.classifier import load_classifier

    cfg = dpo_config(tiny_llama, tmp_path, task="reward")
    cfg["method"] = {"name": "lora", "lora": {"r": 4, "alpha": 8}}
    cfg["optim"] = {"lr": 1e-2, "schedule": "constant"}
    cfg["train"]["max_steps"] = 12
    result = train(cfg, show_progress=False)
    summary = json.loads((result.run_dir / "eval" / "summary.json").read_text())
    assert summary["task"] == "reward" and summary["metrics"]["accuracy"] >= 0.9
    assert summary["metrics"]["margin"] > 0
    steps = [r for r in map(json.loads, (result.run_dir / "metrics.jsonl").open()) if "loss" in r]
    assert steps[-1]["accuracy"] >= 0.75 and steps[-1]["margin"] > steps[0]["margin"]
    report = (result.run_dir / "report.md").read_text()
    assert "## Preferences (reward model)" in report and "the reward model ranks" in report
    meta = json.loads((result.model_dir / "strop_model.json").read_text())
    clf = load_classifier(result.model_dir, meta["base_model"], torch.device("cpu"), torch.float32)
    assert clf.labels == ["reward"] and clf.pooling == "last"


def test_a_finished_dpo_run_is_refused_unless_asked_for_more_steps(tiny_llama, tmp_path, monkeypatch):
    """...and training it further reuses the stored reference log-probs (identical values), unless the
    file is damaged, when they are computed again."""
    from strop.core.errors import StropError
    from strop.recipes import preference as recipe

    passes, seen = [], []
    real = recipe.reference_logps
    monkeypatch.setattr(recipe, "reference_logps", lambda *a: passes.append(a[-1]) or real(*a))
    real_fit = loop_fit
    monkeypatch.setattr(
        "strop.recipes.skeleton.fit",
        lambda m, obj, ts, *a, **k: seen.append(ts.reference) or real_fit(m, obj, ts, *a, **k),
    )
    cfg = dpo_config(tiny_llama, tmp_path)
    cfg["train"] = {"batch_size": 4, "max_steps": 1, "seed": 0}
    cfg["eval"] = {"enabled": False}
    train(cfg, show_progress=False)
    assert passes == ["train", "validation"]
    with pytest.raises(StropError, match="already holds a finished run"):
        train(cfg, show_progress=False)
    more = train(cfg, ["train.max_steps=2"], show_progress=False)
    records = [json.loads(x) for x in (more.run_dir / "metrics.jsonl").open()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]  # resumed, not restarted
    assert passes == ["train", "validation"] and np.array_equal(seen[0], seen[1])
    (more.run_dir / "reference_logps.safetensors").write_bytes(b"not safetensors")
    train(cfg, ["train.max_steps=3"], show_progress=False)
    assert passes == ["train", "validation"] * 2 and np.allclose(seen[2], seen[0], atol=1e-5)


def test_head_only_reward_model_runs_the_backbone_once_per_reply(tiny_llama, tmp_path, monkeypatch):
    """Feature-based reward model: every reply's pooled features are computed once (before training),
    so the frozen backbone never runs inside the training loop, and it still learns the planted ranking."""
    from strop.models.classifier import SequenceClassifier

    calls = {"n": 0}
    original = SequenceClassifier.cache_features

    def counting(self, rows, *args, **kwargs):
        calls["n"] += len(rows)
        return original(self, rows, *args, **kwargs)

    monkeypatch.setattr(SequenceClassifier, "cache_features", counting)
    cfg = dpo_config(tiny_llama, tmp_path, task="reward")
    cfg["method"] = {"name": "head"}
    cfg["optim"] = {"lr": 5e-2, "schedule": "constant"}
    cfg["train"]["max_steps"] = 30
    result = train(cfg, show_progress=False)
    data = json.loads((result.run_dir / "data_summary.json").read_text())
    assert calls["n"] == 2 * (data["train_pairs"] + data["validation_pairs"])
    summary = json.loads((result.run_dir / "eval" / "summary.json").read_text())
    assert summary["metrics"]["accuracy"] >= 0.9


def test_preference_config_mistakes_are_named(tiny_llama, tmp_path):
    cfg = dpo_config(tiny_llama, tmp_path)
    cfg["method"] = {"name": "head"}
    with pytest.raises(ConfigError, match="method.name: head trains only a head.*got task: dpo"):
        load_config(cfg)
    cfg = dpo_config(tiny_llama, tmp_path, dpo={"loss": "ipo", "label_smoothing": 0.1})
    with pytest.raises(ConfigError, match="dpo.label_smoothing"):
        load_config(cfg)


def test_strop_score_ranks_the_planted_reply_higher(tiny_llama, tmp_path, capsys):
    from strop.cli.main import main

    cfg = dpo_config(tiny_llama, tmp_path, task="reward")
    cfg["method"] = {"name": "lora", "lora": {"r": 4, "alpha": 8}}
    cfg["optim"] = {"lr": 1e-2, "schedule": "constant"}
    cfg["train"]["max_steps"] = 12
    result = train(cfg, show_progress=False)
    rows = write_jsonl(
        tmp_path / "replies.jsonl",
        [
            {"prompt": "Write a short poem 99.", "response": "The sea is wide and blue and deep."},
            {"prompt": "Write a short poem 99.", "response": "The capital of France is Paris."},
        ],
    )
    assert main(["score", str(result.run_dir), "--file", str(rows)]) == 0
    scored = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert scored[0]["reward"] > scored[1]["reward"] and scored[0]["prompt"] == "Write a short poem 99."


def rated(n: int) -> list[dict]:
    """Replies about the sea are rated 5, replies about Paris 1, a mix in between 3."""
    replies = [("The sea is wide and blue.", 5), ("The capital is Paris.", 1), ("The sea of Paris.", 3)]
    return [
        {"prompt": f"Write a line {i}.", "response": replies[i % 3][0], "rating": replies[i % 3][1]}
        for i in range(n)
    ]


def test_reward_model_on_ratings_learns_the_scores(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "rated.jsonl", rated(30))
    test = write_jsonl(tmp_path / "test.jsonl", rated(9))
    cfg = tiny_config(tiny_llama, data, tmp_path / "runs", task="reward", reward_model={"target": "ratings"})
    cfg["data"]["test"] = [str(test)]
    cfg["method"] = {"name": "lora", "lora": {"r": 4, "alpha": 8}}
    cfg["optim"] = {"lr": 1e-2, "schedule": "constant"}
    cfg["train"]["max_steps"] = 40
    cfg["eval"] = {"enabled": True}
    result = train(cfg, show_progress=False)
    summary = json.loads((result.run_dir / "eval" / "summary.json").read_text())
    assert summary["set"] == "test" and summary["examples"] == 9
    m = summary["metrics"]
    variance = float(np.var([5, 1, 3]))  # the error of always predicting the mean rating
    assert m["spearman"] > 0.9 and m["pair_accuracy"] == 1.0 and m["loss"] < 0.5 * variance, m


def test_rating_metrics_against_hand_computed_values():
    from strop.methods.reward import evaluate_ratings

    class Fixed(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            return input_ids[:, :1].float()  # the "reward" is the first token id

    batch = {
        "input_ids": torch.tensor([[1], [2], [4], [3]]),
        "attention_mask": torch.ones(4, 1, dtype=torch.long),
        "ratings": torch.tensor([1.0, 2.0, 3.0, 3.0]),
    }
    m = evaluate_ratings(Fixed(), [batch])
    assert m["val_loss"] == pytest.approx((0 + 0 + 1 + 0) / 4)
    # pairs rated differently: (1,2) (1,3) (1,4) (2,3) (2,4), ordered the same way by the model: all 5
    assert m["val_pair_accuracy"] == 1.0
    assert m["val_pearson"] == pytest.approx(float(np.corrcoef([1, 2, 4, 3], [1, 2, 3, 3])[0, 1]))
    # Spearman: ranks (0,1,3,2) vs (0,1,2.5,2.5)
    assert m["val_spearman"] == pytest.approx(float(np.corrcoef([0, 1, 3, 2], [0, 1, 2.5, 2.5])[0, 1]))


def test_pair_accuracy_counts_only_pairs_rated_differently_in_any_chunking():
    from strop.methods.reward import _pair_accuracy

    pred, rating = torch.tensor([1.0, 2.0, 3.0, 0.0]), torch.tensor([1.0, 2.0, 2.0, 3.0])
    # rated differently: (0,1) agree, (0,2) agree, (0,3) (1,3) (2,3) disagree; (1,2) tied, not counted
    for chunk in (1, 3, 1024):
        assert _pair_accuracy(pred, rating, chunk) == pytest.approx(2 / 5)
    assert np.isnan(_pair_accuracy(pred, torch.ones(4)))


def test_bad_rating_names_file_line_and_field(tiny_llama, tmp_path):
    rows = rated(4)
    rows[2]["rating"] = "good"
    data = write_jsonl(tmp_path / "rated.jsonl", rows)
    cfg = tiny_config(tiny_llama, data, tmp_path / "runs", task="reward", reward_model={"target": "ratings"})
    with pytest.raises(DataError, match=r"rated.jsonl:3: field 'rating': expected a number, got 'good'"):
        train(cfg, show_progress=False)
    with pytest.raises(ConfigError, match="reward_model.target: ratings train a reward model"):
        load_config({**cfg, "task": "dpo"})


def test_bad_rated_rows_are_listed_by_the_check_and_skipped_on_request(tiny_llama, tmp_path, template):
    import re

    from strop.data.ratings import build_ratings
    from strop.recipes.data_check import run_check

    rows = rated(6)
    rows[1]["rating"] = "good"
    rows[4] = {"prompt": "no reply", "rating": 2}
    data = write_jsonl(tmp_path / "rated.jsonl", rows)
    cfg = tiny_config(tiny_llama, data, tmp_path / "runs", task="reward", reward_model={"target": "ratings"})
    errors = run_check(load_config(cfg)).report["errors"]
    assert len(errors) == 2, errors  # every bad row, not only the first
    assert re.search(r"rated.jsonl:2: field 'rating': expected a number, got 'good'$", errors[0])
    assert re.search(r"rated.jsonl:5: field 'response': expected 'prompt' and a non-empty", errors[1])
    lenient = DataConfig(train=[str(data)], val_fraction=0.0, max_length=64, skip_bad_rows=True)
    out = build_ratings(lenient, template, seed=0, field="rating")
    assert len(out.train) == 4 and out.summary["rejected_rows"] == 2
    assert [r.where.rsplit(":", 1)[1] for r in out.rejected] == ["2", "5"]


def test_rated_rows_keep_their_reply_when_the_prompt_is_long(tmp_path, template, tokenizer):
    from strop.data.ratings import build_ratings

    rows = rated(6)
    rows[1]["prompt"] = "word " * 200  # the reply starts past max_length: the prompt's start goes
    path = write_jsonl(tmp_path / "rated.jsonl", rows)
    data = build_ratings(
        DataConfig(train=[str(path)], val_fraction=0.0, max_length=64), template, seed=0, field="rating"
    )
    assert data.summary["dropped_reply_cut_away"] == 0 and len(data.train.ids[1]) == 64
    assert rows[1]["response"] in tokenizer.decode(data.train.ids[1])
    assert data.train.ratings.tolist() == [r["rating"] for r in rows]


def test_reward_model_on_an_encoder_ranks_and_scores(tiny_bert, tmp_path, capsys):
    """The README's promise: a reward model may be an encoder with mean pooling, whose tokenizer has no
    end-of-sequence token (it reads conversations, it never writes one)."""
    import shutil

    from conftest import run_cli
    from strop.models.load import load_tokenizer

    encoder = tmp_path / "encoder"
    shutil.copytree(tiny_bert, encoder)
    config = json.loads((encoder / "tokenizer_config.json").read_text())
    config["eos_token"] = None
    (encoder / "tokenizer_config.json").write_text(json.dumps(config))
    assert load_tokenizer(str(encoder)).eos_token is None  # as MiniLM's: [CLS] ... [SEP], no EOS
    cfg = dpo_config(encoder, tmp_path, task="reward")
    cfg["method"] = {"name": "full"}
    cfg["optim"] = {"lr": 1e-3, "schedule": "constant"}
    cfg["train"]["max_steps"] = 16
    result = train(cfg, show_progress=False)
    summary = json.loads((result.run_dir / "eval" / "summary.json").read_text())
    assert summary["metrics"]["accuracy"] >= 0.8, summary
    assert json.loads((result.model_dir / "classifier.json").read_text())["pooling"] == "mean"
    scored = tmp_path / "scored.jsonl"
    rows = pairs(24)[:6]
    replies = write_jsonl(
        tmp_path / "replies.jsonl",
        [{"prompt": r["prompt"], "response": r[side]} for r in rows for side in ("chosen", "rejected")],
    )
    rc, _, err = run_cli(["score", str(result.run_dir), "--file", str(replies), "--out", str(scored)], capsys)
    assert rc == 0, err
    rewards = [json.loads(line)["reward"] for line in scored.read_text().splitlines()]
    assert sum(c > r for c, r in zip(rewards[::2], rewards[1::2], strict=True)) >= 5


def test_test_pairs_that_copy_training_pairs_stop_the_run(tiny_llama, tmp_path):
    """As for SFT: given test files with copies of training pairs stop the run (a score on them measures
    memory), unless data.allow_leakage says to go on."""
    from strop.core.errors import DataError

    train_rows = pairs(12)
    cfg = dpo_config(tiny_llama, tmp_path)
    cfg["data"]["train"] = [str(write_jsonl(tmp_path / "train.jsonl", train_rows))]
    cfg["data"]["test"] = [str(write_jsonl(tmp_path / "test.jsonl", train_rows[:2]))]
    cfg["train"]["max_steps"] = 1
    with pytest.raises(DataError, match=r"data.test: \d+ pair\(s\) duplicate .* data.allow_leakage: true"):
        train(cfg, show_progress=False)
    cfg["data"]["allow_leakage"] = True
    train(cfg, show_progress=False)
