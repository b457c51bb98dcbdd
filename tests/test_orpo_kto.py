"""ORPO and KTO: losses by hand and against TRL's (tests only), the feedback data format and its
malformed-row errors, and tiny runs through the one skeleton."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import tiny_config, write_jsonl
from strop.core.errors import DataError
from strop.methods.kto import auc, kto_loss
from strop.methods.orpo import ORPO, log1mexp, orpo_loss
from strop.recipes.run import train


def neg_logsigmoid(x: float) -> float:
    return math.log1p(math.exp(-x))


# --- ORPO ---------------------------------------------------------------------------------------------


def test_orpo_by_hand():
    c, r = torch.tensor([-0.5, -2.0]), torch.tensor([-1.0, -0.25])  # mean log-probs per reply token
    loss, m = orpo_loss(c, r, beta=0.2)

    def log_odds(x):  # log(p / (1 - p)) with p = exp(x)
        p = math.exp(x)
        return math.log(p / (1 - p))

    per_pair = [
        -cx + 0.2 * neg_logsigmoid(log_odds(cx) - log_odds(rx)) for cx, rx in ((-0.5, -1.0), (-2.0, -0.25))
    ]
    assert loss.item() == pytest.approx(sum(per_pair) / 2, rel=1e-6)
    assert m["nll_loss"] == pytest.approx(1.25)
    assert m["rewards/accuracy"] == 0.5 and m["rewards/chosen"] == pytest.approx(0.2 * -1.25)


def test_log1mexp_is_accurate_on_both_sides_of_its_branch():
    x = torch.tensor([-1e-8, -0.1, -0.69, -0.7, -5.0, -40.0], dtype=torch.float64)
    assert torch.allclose(log1mexp(x), torch.log(1 - torch.exp(x)), rtol=1e-6)  # float64 reference


def test_orpo_matches_trl():
    pytest.importorskip("trl")
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    g = torch.Generator().manual_seed(4)
    c, r = -3 * torch.rand(6, generator=g) - 1e-3, -3 * torch.rand(6, generator=g) - 1e-3
    stub = SimpleNamespace(beta=0.25, accelerator=SimpleNamespace(device=torch.device("cpu")))
    losses, chosen_rewards, rejected_rewards, ratio, log_odds = ORPOTrainer.odds_ratio_loss(stub, c, r)
    loss, m = orpo_loss(c, r, beta=0.25)
    # TRL: loss = nll - mean(beta * ratio); its nll is the cross-entropy of the chosen tokens, which
    # for equally long replies is the mean over pairs of -(mean log-prob per token)
    assert loss.item() == pytest.approx((-c).mean().item() - losses.mean().item(), abs=1e-6)
    assert m["log_odds_ratio"] == pytest.approx(ratio.item(), abs=1e-6)
    assert m["log_odds_chosen"] == pytest.approx(log_odds.item(), abs=1e-6)
    assert m["rewards/chosen"] == pytest.approx(chosen_rewards.mean().item(), abs=1e-6)
    assert m["rewards/rejected"] == pytest.approx(rejected_rewards.mean().item(), abs=1e-6)


def test_orpo_gradient_raises_chosen_and_lowers_rejected():
    c, r = torch.tensor([-1.0, -2.0], requires_grad=True), torch.tensor([-1.5, -0.5], requires_grad=True)
    orpo_loss(c, r, beta=0.5)[0].backward()
    assert (c.grad < 0).all() and (r.grad > 0).all()


def test_orpo_objective_uses_mean_log_probs_and_no_reference():
    objective = ORPO(beta=0.1)
    assert objective.needs == frozenset()  # no reference pass before training
    loss, _ = objective.pair_loss(
        torch.tensor([-4.0]), torch.tensor([-3.0]), torch.tensor([4.0]), torch.tensor([2.0]), None
    )
    assert loss.item() == pytest.approx(orpo_loss(torch.tensor([-1.0]), torch.tensor([-1.5]), 0.1)[0].item())


# --- KTO ----------------------------------------------------------------------------------------------


def test_kto_by_hand():
    policy, ref = torch.tensor([-1.0, -2.0, -3.0]), torch.tensor([-1.5, -1.0, -3.0])  # r = 0.5, -1, 0
    policy_kl, ref_kl = (
        torch.tensor([-4.0, -5.0, -6.0]),
        torch.tensor([-4.5, -5.0, -6.3]),
    )  # z = mean(.5,0,.3)
    good = torch.tensor([True, False, True])
    losses, m = kto_loss(
        policy, policy_kl, ref, ref_kl, good, beta=0.5, desirable_weight=2.0, undesirable_weight=0.5
    )
    z = (0.5 + 0.0 + 0.3) / 3
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = [2.0 * (1 - sig(0.5 * (0.5 - z))), 0.5 * (1 - sig(0.5 * (z + 1.0))), 2.0 * (1 - sig(0.5 * -z))]
    assert losses.tolist() == pytest.approx(expected, rel=1e-6)
    assert m["kl"] == pytest.approx(z)
    assert m["rewards/accuracy"] == pytest.approx(2 / 3)  # 0.25 > 0 good, -0.5 < 0 bad, 0 not > 0 good


def test_kto_reference_point_is_clamped_at_zero_and_not_differentiated():
    policy = torch.tensor([-1.0, -1.0], requires_grad=True)
    policy_kl = torch.tensor([-9.0, -9.0], requires_grad=True)  # below the reference: z would be -4
    losses, m = kto_loss(
        policy, policy_kl, torch.tensor([-1.0, -1.0]), torch.tensor([-5.0, -5.0]), torch.tensor([True, False])
    )
    assert m["kl"] == 0.0
    losses.sum().backward()
    assert policy_kl.grad is None or not policy_kl.grad.any()


def trl_kto(beta, policy, policy_kl, ref, ref_kl, good, weights):
    """TRL's KTOTrainer._compute_loss on precomputed log-probs: a stub trainer and model whose per-token
    log-probs put each row's sum on its first completion token."""
    pytest.importorskip("trl")
    from trl.trainer.kto_trainer import KTOTrainer

    n, width = len(policy), 3

    def model(**kw):
        logps = kw["input_ids"].new_zeros(n, width - 1, dtype=torch.float32)
        logps[:, 0] = policy_kl if kw.get("_kl") else policy
        return SimpleNamespace(
            log_probs=logps, entropy=torch.zeros(n, width - 1), mean_logits=torch.zeros(n, width - 1)
        )

    def call(**kw):  # TRL runs the KL rows and the rows through the same model; tell them apart by ids
        return model(**kw, _kl=bool((kw["input_ids"] == 7).all()))

    trainer = SimpleNamespace(
        model=SimpleNamespace(training=False),
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x),
        aux_loss_enabled=False, precompute_ref_logps=True, calculate_KL=True, loss_type="kto", beta=beta,
        desirable_weight=weights[0], undesirable_weight=weights[1],
        _metrics={"eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )  # fmt: skip
    trainer._compute_kl_logps = lambda m, batch: KTOTrainer._compute_kl_logps(trainer, m, batch)
    inputs = {
        "input_ids": torch.ones(n, width, dtype=torch.long),
        "attention_mask": torch.ones(n, width, dtype=torch.long),
        "completion_mask": torch.tensor([[0, 1, 0]] * n),
        "KL_input_ids": torch.full((n, width), 7, dtype=torch.long),
        "KL_attention_mask": torch.ones(n, width, dtype=torch.long),
        "KL_completion_mask": torch.tensor([[0, 1, 0]] * n),
        "label": good,
        "ref_logps": ref,
        "ref_KL_logps": ref_kl,
    }
    return KTOTrainer._compute_loss(trainer, call, inputs, return_outputs=False)


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.5, 0.7)])
def test_kto_matches_trl(weights):
    g = torch.Generator().manual_seed(9)
    policy, ref, policy_kl, ref_kl = (-20 * torch.rand(6, generator=g) for _ in range(4))
    good = torch.tensor([True, False, True, True, False, False])
    ours, _ = kto_loss(policy, policy_kl, ref, ref_kl, good, 0.3, *weights)
    theirs = trl_kto(0.3, policy, policy_kl, ref, ref_kl, good, weights)
    assert ours.mean().item() == pytest.approx(theirs.item(), abs=1e-6)


def test_auc_counts_ties_half():
    assert auc(np.array([1.0, 2.0]), np.array([0.0, 2.0])) == pytest.approx((1 + 0 + 1 + 0.5) / 4)
    assert auc(np.zeros(3), np.zeros(2)) == 0.5  # the starting model: every log-ratio is 0
    assert math.isnan(auc(np.zeros(0), np.ones(2)))


# --- the feedback format and KTO / ORPO runs ----------------------------------------------------------


def feedback_rows(n: int) -> list[dict]:
    """Good completions say 'blue sky', bad ones 'red rock'; prompts in pairs (one good, one bad)."""
    rows = []
    for i in range(n):
        prompt = f"Describe picture {i // 2}."
        good = i % 2 == 0
        rows.append({"prompt": prompt, "completion": "a blue sky" if good else "a red rock", "label": good})
    return rows


def kto_config(model_dir, tmp_path, n=24, **kto):
    data = tmp_path / "feedback.jsonl"
    write_jsonl(data, feedback_rows(n))
    test = tmp_path / "feedback_test.jsonl"
    write_jsonl(test, [{**r, "prompt": r["prompt"].replace("picture", "photo")} for r in feedback_rows(8)])
    cfg = tiny_config(model_dir, data, tmp_path / "out", task="kto")
    cfg["data"] = {**cfg["data"], "test": [str(test)], "max_length": 64, "template": "chatml"}
    cfg["train"] = {**cfg["train"], "batch_size": 4, "max_steps": 6, "eval_every": 3}
    cfg["method"] = {"name": "full"}
    cfg["optim"] = {**cfg.get("optim", {}), "lr": 3e-3}
    cfg["eval"] = {"enabled": True}
    if kto:
        cfg["kto"] = kto
    return cfg


@pytest.mark.parametrize(
    ("row", "field", "reason"),
    [
        ({"prompt": "hi", "completion": "yo", "label": "maybe"}, "label", "expected true or false"),
        ({"prompt": "hi", "completion": "yo", "label": 2}, "label", "expected true or false"),
        ({"prompt": "hi", "completion": "yo", "label": 1.0}, "label", "expected true or false"),
        ({"prompt": "hi", "completion": "  ", "label": True}, "completion", "empty"),
        ({"prompt": "hi", "completion": 5, "label": True}, "completion", "expected a string"),
        ({"prompt": [], "completion": "yo", "label": True}, "prompt", "non-empty list"),
    ],
)
def test_malformed_feedback_rows_are_named(tmp_path, row, field, reason):
    from strop.core.config import DatasetSource
    from strop.data.build import read_records

    path = tmp_path / "f.jsonl"
    write_jsonl(path, [*feedback_rows(2), row])
    with pytest.raises(DataError, match=rf"f.jsonl:3.*{field}.*{reason}"):
        read_records(DatasetSource(path=str(path), format="feedback"))


def test_feedback_labels_read_from_csv_strings(tmp_path):
    from strop.core.config import DatasetSource
    from strop.data.build import read_records

    path = tmp_path / "f.csv"
    path.write_text("prompt,completion,label\nhi,yo,true\nhey,no,False\nx,y,1\n")
    records = read_records(DatasetSource(path=str(path)))  # detected as feedback
    assert [r.desirable for r in records] == [True, False, True]


def test_kl_rows_pair_each_prompt_with_the_previous_completion(tiny_llama, tmp_path):
    from strop.data.feedback import encode_feedback
    from strop.data.formats import Record
    from strop.data.template import ChatTemplate, resolve_template
    from strop.models.load import load_tokenizer

    tok = load_tokenizer(str(tiny_llama))
    template = ChatTemplate(tok, resolve_template("chatml", tok)[1])
    records = [
        Record(
            str(i),
            messages=({"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}),
            desirable=i == 0,
        )
        for i in range(3)
    ]
    ts = encode_feedback(records, template, 64)
    assert ts.targets == [1, 0, 0]
    decoded = [tok.decode(ids) for ids in ts.rejected.ids]
    assert "q0" in decoded[0] and "a2" in decoded[0]  # row 0 takes the last row's completion
    assert "q1" in decoded[1] and "a0" in decoded[1] and "a1" not in decoded[1]


def test_kto_run_learns_to_prefer_good_completions(tiny_llama, tmp_path):
    result = train(kto_config(tiny_llama, tmp_path), show_progress=False)
    ev = result.eval
    assert ev["task"] == "kto" and ev["set"] == "test" and ev["rows"] == 8 and ev["pairs"] == 4
    assert ev["start_metrics"]["auc"] == pytest.approx(0.5, abs=0.2)
    assert ev["metrics"]["auc"] == 1.0  # every good completion's log-ratio is above every bad one's
    assert ev["preference_accuracy"]["tuned"] == 1.0
    records = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all("kl" in r for r in records if "loss" in r)
    assert (result.run_dir / "reference_logps.safetensors").is_file()
    report = (result.run_dir / "report.md").read_text()
    assert "## Preferences (KTO)" in report and "AUC of the log-ratio" in report


def test_kto_refuses_a_batch_of_one(tiny_llama, tmp_path, capsys):
    from conftest import assert_user_error, run_cli

    cfg = kto_config(tiny_llama, tmp_path)
    cfg["train"]["batch_size"] = 1
    path = tmp_path / "kto.json"
    path.write_text(json.dumps(cfg))
    rc, _, err = run_cli(["train", str(path)], capsys)
    assert_user_error(rc, err, "train.batch_size")


def test_orpo_run_raises_preference_without_a_reference_pass(tiny_llama, tmp_path, monkeypatch):
    from strop.recipes import preference
    from test_preference import dpo_config

    passes = []
    real = preference.reference_logps
    monkeypatch.setattr(preference, "reference_logps", lambda *a: passes.append(a[-1]) or real(*a))
    cfg = dpo_config(tiny_llama, tmp_path, dpo={"loss": "orpo", "beta": 0.2})
    cfg["train"] = {**cfg["train"], "max_steps": 8}
    result = train(cfg, show_progress=False)
    assert "train" not in passes  # reference-free: only held-out pairs get the start's log-probs
    ev = result.eval
    assert ev["objective"] == "orpo" and ev["reference_free"] is True
    per_token = ev["preference_accuracy_per_token"]  # what ORPO's odds use: mean log-probs per token
    assert per_token["tuned"] == 1.0 and per_token["tuned"] >= per_token["start"]
    assert ev["metrics"]["loss"] < ev["start_metrics"]["loss"]
    assert ev["metrics"]["reward_margin"] > ev["start_metrics"]["reward_margin"]
    assert "loss (orpo)" in (result.run_dir / "report.md").read_text()
    records = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("nll_loss" in r and "log_odds_ratio" in r for r in records)


def test_kto_reads_preference_pairs_as_a_good_and_a_bad_row(tiny_llama, tmp_path):
    from test_preference import pairs

    cfg = kto_config(tiny_llama, tmp_path)
    write_jsonl(tmp_path / "pairs.jsonl", pairs(12))
    cfg["data"] = {**cfg["data"], "train": [str(tmp_path / "pairs.jsonl")], "test": [], "val_fraction": 0.25}
    cfg["train"]["max_steps"] = 2
    result = train(cfg, show_progress=False)
    s = result.data
    assert s["train_rows"] + s["validation_rows"] == 24 and s["train_desirable"] == s["train_undesirable"]
    assert result.eval["set"] == "validation" and result.eval["pairs"] == s["validation_rows"] // 2
