"""PPO and GRPO: prompts keep their columns, reply log-probs and values equal the full-logits reference,
micro-batching leaves the update unchanged, the LoRA reference is the starting model, the reward rises on
a programmatic task, and rewards come from built-ins, Python files or a strop reward run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import tiny_config, write_jsonl
from strop.core.config import DatasetSource, load_config
from strop.core.errors import ConfigError, DataError
from strop.data.batches import IGNORE
from strop.data.prompts import read_prompts
from strop.data.template import ChatTemplate, resolve_template
from strop.eval import rewards
from strop.methods import logprobs
from strop.methods.ppo_losses import grpo_advantages
from strop.methods.rl import PPO, ValueHead, response_logps
from strop.methods.rl_losses import DAPO
from strop.models.load import load_model
from strop.recipes.run import train
from strop.training.rl_loop import _rows
from strop.training.rollout import layout

REWARD_FILE = """
def letter_e(prompts, completions, **_):
    return [float("e" in c) for c in completions]
"""


@pytest.fixture
def template(tokenizer):
    return ChatTemplate(tokenizer, resolve_template("chatml", tokenizer)[1])


def rl_config(model_dir, tmp_path, task="ppo", method="full", steps=25, **rl):
    data = write_jsonl(
        tmp_path / "prompts.jsonl", [{"prompt": f"Say something about {i}."} for i in range(40)]
    )
    (tmp_path / "reward.py").write_text(REWARD_FILE)
    section = {
        "reward": f"{tmp_path / 'reward.py'}:letter_e",
        "prompts_per_step": 8,
        "group_size": 4 if task == "grpo" else 1,
        "max_new_tokens": 2,
        "update_epochs": 4,
        "eval_prompts": 8,
        **rl,
    }
    cfg = tiny_config(
        model_dir,
        data,
        tmp_path / "runs",
        task=task,
        name=task,
        rl=section,
        method={"name": method},
        optim={"lr": 1e-2},
        train={"max_steps": steps, "threads": 1},
        eval={"enabled": True},
    )
    cfg["data"]["max_length"] = 96
    return cfg


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("task", ["ppo", "grpo"])
def test_reward_rises_on_a_programmatic_task(tiny_llama, tmp_path, task):
    result = train(rl_config(tiny_llama, tmp_path, task), show_progress=False)
    steps = [r for r in metrics(result.run_dir) if "reward" in r]
    first = sum(r["reward"] for r in steps[:5]) / 5
    last = sum(r["reward"] for r in steps[-5:]) / 5
    assert last > first + 0.3, (first, last)  # about 0.2 -> 0.9 for both
    assert (
        result.eval["set"] == "validation"
        and result.eval["reward"]["tuned"] >= result.eval["reward"]["start"]
    )
    gain = result.eval["reward"]["gain"]  # paired over the same prompts, with its bootstrap interval
    assert gain["diff"] == pytest.approx(result.eval["reward"]["tuned"] - result.eval["reward"]["start"])
    assert gain["ci"][0] <= gain["diff"] <= gain["ci"][1]
    report = (result.run_dir / "report.md").read_text()
    assert "95% paired-bootstrap interval" in report
    assert (
        "Reward (reinforcement learning)" in report
        and (result.run_dir / "report_files" / "reward.png").is_file()
        and (result.run_dir / "report_files" / "policy.png").is_file()  # reply length, clip fractions
    )
    assert "Rollout reward rose" in report and "final training loss" not in report.split("## Summary")[0]
    assert (result.model_dir / "strop_model.json").is_file()


def test_lora_reference_is_the_starting_model(tiny_llama, tmp_path):
    """With LoRA the reference is the adapter switched off: at step 1 policy = reference, so the
    sampled KL is exactly 0; later it is not."""
    cfg = rl_config(tiny_llama, tmp_path, "grpo", method="lora", steps=3)
    cfg["optim"]["lr"] = 5e-2
    result = train(cfg, show_progress=False)
    kls = [r["kl"] for r in metrics(result.run_dir) if "kl" in r]
    assert abs(kls[0]) < 1e-5 and any(abs(k) > 1e-4 for k in kls[1:])
    assert (result.model_dir / "adapter_config.json").is_file()


def test_no_kl_penalty_skips_the_reference_pass(tiny_llama, tmp_path, monkeypatch):
    """kl_coef 0 without target_kl: the reference never runs and no KL is logged, but training does."""
    from strop.recipes import rl as recipe

    calls = {"n": 0}
    real = recipe._reference

    def counting(*args):
        ref = real(*args)

        def wrapped(batch):
            calls["n"] += 1
            return ref(batch)

        return wrapped

    monkeypatch.setattr(recipe, "_reference", counting)
    cfg = rl_config(tiny_llama, tmp_path, "grpo", method="lora", steps=2, kl_coef=0.0)
    result = train(cfg, show_progress=False)
    steps = [r for r in metrics(result.run_dir) if "reward" in r]
    assert calls["n"] == 0 and len(steps) == 2
    assert all("kl" not in r and "kl_loss" not in r for r in steps)
    assert "No KL to the starting model was measured" in (result.run_dir / "report.md").read_text()
    assert all(math.isfinite(r["loss"]) for r in steps)
    (tmp_path / "kl").mkdir()
    cfg = rl_config(tiny_llama, tmp_path / "kl", "grpo", method="lora", steps=1, kl_coef=0.01)
    train(cfg, show_progress=False)
    assert calls["n"] > 0


def test_the_weights_of_the_best_held_out_reward_are_kept(tiny_llama, tmp_path, monkeypatch):
    """Scripted held-out rewards 0.95 (start), 0.9 (step 1), 0.3, 0.2 (end): the run ends with step 1's
    weights, re-scores them for the summary, and the report says which step was kept and that the
    start (never a candidate) beat them all."""
    from strop.training import rl_loop

    scripted, seen = [0.95, 0.9, 0.3, 0.2, 0.9], []

    def fake(policy, *args):
        seen.append([p.detach().clone() for p in policy.parameters() if p.requires_grad])
        return {"reward": scripted[len(seen) - 1], "reply_tokens": 2.0, "samples": []}

    monkeypatch.setattr(rl_loop, "evaluate_reward", fake)
    cfg = rl_config(tiny_llama, tmp_path, "grpo", method="lora", steps=3)
    cfg["train"]["eval_every"] = 1
    cfg["optim"]["lr"] = 5e-2
    result = train(cfg, show_progress=False)
    assert len(seen) == 5  # start, steps 1-3, and the kept weights re-scored
    assert all(torch.equal(a, b) for a, b in zip(seen[4], seen[1], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(seen[3], seen[1], strict=True))
    saved = json.loads((result.run_dir / "result.json").read_text())["metrics"]
    assert saved["kept_step"] == saved["best_step"] == 1 and saved["best_val_reward"] == 0.9
    assert saved["val_reward"] == 0.9
    report = (result.run_dir / "report.md").read_text()
    assert "Kept the weights of step 1" in report and "beat every trained step" in report


def test_a_finished_rl_run_is_not_trained_or_exported_again(tiny_llama, tmp_path):
    from strop.core.errors import StropError

    cfg = rl_config(tiny_llama, tmp_path, "grpo", method="lora", steps=1)
    first = train(cfg, show_progress=False)
    exported = (first.model_dir / "adapter_model.safetensors").stat().st_mtime_ns
    with pytest.raises(StropError, match="already holds a finished run"):
        train(cfg, show_progress=False)
    assert (first.model_dir / "adapter_model.safetensors").stat().st_mtime_ns == exported


@pytest.mark.parametrize("task", ["ppo", "grpo"])
def test_non_finite_updates_are_skipped_counted_and_stop_the_run(
    task, tiny_llama, tmp_path, monkeypatch, caplog
):
    """The loop's policy for a loss gone NaN, as in fit: skip the update, count, warn, and stop after
    train.max_bad_steps steps in a row with nothing but non-finite updates."""
    from strop.core.errors import TrainingStopped
    from strop.methods import rl, rl_losses
    from strop.training import rl_loop

    steps, bad = [], set()
    real_sample, objective = rl_loop.sample, {"ppo": rl.PPO, "grpo": rl_losses.DAPO}[task]
    real_loss = objective.loss

    def sample(*args, **kwargs):
        steps.append(1)
        return real_sample(*args, **kwargs)

    def loss(*args, **kwargs):
        out = real_loss(*args, **kwargs)
        return out._replace(total=out.total * float("nan")) if len(steps) in bad else out

    monkeypatch.setattr(rl_loop, "sample", sample)
    monkeypatch.setattr(objective, "loss", loss)
    cfg = rl_config(tiny_llama, tmp_path, task, steps=4)
    bad.add(2)
    result = train({**cfg, "name": "once"}, show_progress=False)
    assert result.metrics["skipped_steps"] == 1
    assert "step 2: 4 of 4 updates had a non-finite loss or gradient; skipped" in caplog.text
    skipped = [r.get("skipped_updates", 0) for r in metrics(result.run_dir) if "reward" in r]
    assert skipped == [0, 4, 0, 0]

    steps.clear()
    bad.update({1, 3, 4})
    with pytest.raises(
        TrainingStopped, match="3 consecutive steps had only non-finite updates; stopped at step 3"
    ):
        train({**cfg, "name": "always"}, show_progress=False)


def test_response_logps_and_values_match_full_logits(tiny_model, template, tokenizer, monkeypatch):
    monkeypatch.setattr(logprobs, "CHUNK", 2)  # the four reply tokens in two chunks of the LM head
    model = load_model(str(tiny_model), torch.device("cpu"), torch.float32)
    prompts = [
        template.prompt_ids([{"role": "user", "content": t}]) for t in ("Hi there.", "Tell me a story")
    ]
    replies = [[5, 9, 17], [40]]
    batch = layout(prompts, replies, tokenizer.pad_token_id)
    assert batch["response_mask"].tolist() == [[True, True, True], [True, False, False]]
    head = ValueHead(model.config.hidden_size)
    torch.nn.init.normal_(head.linear.weight)
    logps, values = response_logps(model, batch, temperature=0.7, value_head=head)
    out = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True
    )
    for b, (p, r) in enumerate(zip(prompts, replies, strict=True)):
        for t, token in enumerate(r):
            pos = len(p) + t - 1  # the position that predicts reply token t
            want = (out.logits[b, pos] / 0.7).log_softmax(-1)[token]
            assert torch.allclose(logps[b, t], want, atol=1e-5)
            assert torch.allclose(values[b, t], head(out.hidden_states[-1][b, pos]), atol=1e-5)
        assert batch["labels"][b][batch["labels"][b] != IGNORE].tolist() == r
    assert logps[1, 1:].eq(0).all() and values[1, 1:].eq(0).all()


@pytest.mark.parametrize("method", ["ppo", "grpo"])
def test_micro_batches_give_the_same_gradient(tiny_llama, template, tokenizer, method):
    """A mini-batch run as micro-batches, each weighted by its share of reply tokens, gives the
    gradient of the whole mini-batch (the loop's accumulation)."""
    torch.manual_seed(0)
    model = load_model(str(tiny_llama), torch.device("cpu"), torch.float32)
    head = ValueHead(model.config.hidden_size)
    prompts = [template.prompt_ids([{"role": "user", "content": "x" * (i + 1)}]) for i in range(4)]
    replies = [[5, 9, 17, 3], [40], [7, 7], [11, 12, 13]]
    batch = layout(prompts, replies, tokenizer.pad_token_id)
    mask = batch["response_mask"]
    with torch.no_grad():
        old, values = response_logps(model, batch, 1.0, head)
    batch |= {"old_logps": old - 0.05 * torch.randn_like(old), "ref_logps": old + 0.1, "old_values": values}
    if method == "ppo":
        batch |= {"advantages": torch.randn(mask.shape), "returns": torch.randn(mask.shape)}
    else:
        batch["advantages"] = grpo_advantages(torch.tensor([1.0, 0.0, 0.5, 0.2]), 2)

    if method == "ppo":
        loss = PPO(head, 1.0, 0.2, 0.2, 0.5, kl_coef=0.1, gamma=1.0, lam=0.95)
    else:  # the token-level mean: micro-batches weigh by their reply tokens
        loss = DAPO(1.0, 0.2, 0.28, kl_coef=0.1, group_size=2, max_new_tokens=8)

    def objective(b):  # the mean over the reply tokens of b
        out = loss.loss(model, b)
        return out.total / out.count

    params = [p for p in model.parameters()] + list(head.parameters())
    whole = torch.autograd.grad(objective(batch), params, allow_unused=True)
    parts = [torch.tensor([0, 3]), torch.tensor([1]), torch.tensor([2])]
    total = None
    for rows in parts:
        w = mask[rows].sum() / mask.sum()
        g = torch.autograd.grad(objective(_rows(batch, rows)) * w, params, allow_unused=True)
        total = g if total is None else [a + b if a is not None else b for a, b in zip(total, g, strict=True)]
    for a, b in zip(whole, total, strict=True):
        if a is not None:
            assert torch.allclose(a, b, atol=1e-6)


def test_prompt_rows_keep_their_columns(tmp_path, template):
    rows = [
        {"question": "What is 2 + 2?", "answer": "2 + 2 = 4\n#### 4"},
        {"prompt": "Human: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant:"},
        {
            "messages": [
                {"role": "user", "content": "Name a colour."},
                {"role": "assistant", "content": "Red."},
            ]
        },
        {"instruction": "Translate", "input": "bonjour", "word": "hello"},
        {"prompt": "x " * 200},
    ]
    got, too_long = read_prompts(
        DatasetSource(path=str(write_jsonl(tmp_path / "p.jsonl", rows))), template, 60
    )
    assert too_long == 1 and len(got) == 4
    assert got[0].columns["answer"].endswith("#### 4") and got[0].messages[-1]["content"] == "What is 2 + 2?"
    assert [m["role"] for m in got[1].messages] == ["user", "assistant", "user"]
    assert got[2].messages == ({"role": "user", "content": "Name a colour."},)
    assert got[3].columns["word"] == "hello" and got[3].messages[-1]["content"] == "Translate\n\nbonjour"
    assert list(got[0].ids) == template.prompt_ids(list(got[0].messages))

    write_jsonl(tmp_path / "bad.jsonl", [{"question": "ok?"}, {"text": "no prompt here"}])
    with pytest.raises(DataError, match=r"bad.jsonl:2.*'prompt', 'messages'"):
        read_prompts(DatasetSource(path=str(tmp_path / "bad.jsonl")), template, 60)


def test_built_in_rewards():
    assert rewards.length([""] * 3, ["a b", "a b c d", ""], target=2) == [0.0, -1.0, -1.0]
    assert rewards.contains([""] * 2, ["Hello World", "nothing"], word="world") == [1.0, 0.0]
    assert rewards.avoid([""] * 2, ["The cat and the theme.", "A cat."], word="the") == [-2.0, -0.0]
    answers = ["Natalia sold 48 + 24 = 72 clips.\n#### 72", "#### 1,200"]
    assert rewards.gsm8k(
        [""] * 2, ["So the answer is 72.", "It is 1200 dollars, not 1300."], answer=answers
    ) == [
        1.0,
        0.0,
    ]
    assert rewards.exact_match([""] * 2, ["the answer: 7", "8"], answer=["7", "9"]) == [1.0, 0.0]


def test_reward_function_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="rl.reward: 'nope' is not"):
        rewards.reward_function("nope", {})
    with pytest.raises(ConfigError, match="rl.reward: file not found: missing.py"):
        rewards.reward_function("missing.py:f", {})
    with pytest.raises(ConfigError, match="cannot import 'no_such_module'"):
        rewards.reward_function("no_such_module:f", {})
    (tmp_path / "r.py").write_text("def short(prompts, completions, **_):\n    return [1.0]\n")
    fn = rewards.reward_function(f"{tmp_path / 'r.py'}:short", {})
    with pytest.raises(ConfigError, match="short returned 1 scores for 2 completions"):
        rewards.call_reward(fn, ["a", "b"], ["c", "d"], [{}, {}])
    with pytest.raises(ConfigError, match="has no function 'other'"):
        rewards.reward_function(f"{tmp_path / 'r.py'}:other", {})


def test_rl_config_mistakes_are_named(tiny_llama, tmp_path):
    cfg = rl_config(tiny_llama, tmp_path)
    with pytest.raises(ConfigError, match="rl: task ppo needs an rl section"):
        load_config({**cfg, "rl": None})
    with pytest.raises(ConfigError, match="rl.group_size: grpo compares"):
        load_config({**cfg, "task": "grpo", "rl": {**cfg["rl"], "group_size": 1}})
    with pytest.raises(ConfigError, match="rl: the rl section is for task ppo or grpo"):
        load_config({**cfg, "task": "sft"})
    with pytest.raises(ConfigError, match="method.name: head"):
        load_config({**cfg, "method": {"name": "head"}})
    # the group-relative settings: refused by a ppo run before it loads a model
    with pytest.raises(ConfigError, match="rl.loss: task ppo does not use it"):
        train({**cfg, "rl": {**cfg["rl"], "loss": "rloo"}}, show_progress=False)


def test_a_strop_reward_run_scores_the_rollouts(tiny_llama, tmp_path):
    """PPO against a frozen reward model: the rollout rewards are that run's scores of the replies."""
    from strop.methods.reward import RewardScorer
    from strop.recipes.rl import build_reward

    pairs = [{"prompt": f"Q{i}", "chosen": "The sea is wide.", "rejected": "Paris."} for i in range(8)]
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    rm = train(tiny_config(tiny_llama, data, tmp_path / "rm", task="reward", name="rm"), show_progress=False)
    cfg = rl_config(tiny_llama, tmp_path, "ppo", steps=2, reward=str(rm.run_dir))
    result = train(cfg, show_progress=False)
    assert len([r for r in metrics(result.run_dir) if "reward" in r]) == 2
    reward = build_reward(str(rm.run_dir), {}, torch.device("cpu"))
    from strop.data.prompts import Prompt

    p = Prompt("a", ({"role": "user", "content": "Q1"},))
    scorer = RewardScorer(rm.run_dir, torch.device("cpu"))
    want = scorer([[{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "The sea is wide."}]])
    assert reward([p], ["The sea is wide."]) == pytest.approx(want)
    # a conversation longer than the reward model was trained on (64 tokens) keeps its last 64
    long = [{"role": "user", "content": "Q1 " * 100}, {"role": "assistant", "content": "Paris."}]
    ids = scorer.template.encode(long).ids
    assert scorer.max_length == 64 and len(ids) > 64
    with torch.no_grad():
        tail = scorer.model(
            input_ids=torch.tensor([ids[-64:]]), attention_mask=torch.ones(1, 64, dtype=torch.long)
        )[0, 0]
    assert scorer([long]) == pytest.approx([float(tail)], abs=1e-5) and scorer.truncated == 1


def test_missing_eos_penalty_is_taken_off_cut_off_replies(tiny_llama, tmp_path):
    """Two-token replies from a random model rarely end their turn: each cut-off reply loses 5."""
    cfg = rl_config(tiny_llama, tmp_path, "ppo", steps=2, missing_eos_penalty=5.0)
    result = train(cfg, show_progress=False)
    for r in [r for r in metrics(result.run_dir) if "reward" in r]:
        assert r["cut_off"] > 0.5  # the raw reward (letter e) is 0 or 1 per reply, so:
        assert -5 * r["cut_off"] - 1e-6 <= r["reward"] <= 1 - 5 * r["cut_off"] + 1e-6, r


def test_sampling_ignores_the_models_own_generation_settings(tiny_llama, template):
    """A model's generation_config may switch on min_p, repetition penalties and the like; rollouts must
    still draw from softmax(logits / T), the distribution the log-probs score."""
    from strop.data.prompts import Prompt
    from strop.training.rollout import sample

    model = load_model(str(tiny_llama), torch.device("cpu"), torch.float32)
    model.generation_config.min_p = 0.99  # on its own, every sample would be the most likely token
    model.generation_config.repetition_penalty = 50.0
    msgs = ({"role": "user", "content": "Say something."},)
    p = Prompt("a", msgs, {}, tuple(template.prompt_ids(list(msgs))))
    torch.manual_seed(0)
    s = sample(model, template, [p] * 64, 1, 1.0)
    first = s.batch["input_ids"][torch.arange(64), s.batch["attention_mask"].sum(1) - 1]
    assert len(set(first.tolist())) > 20  # near-uniform tiny model: ~60 distinct of 400


def test_reward_args_win_over_row_columns():
    fn = rewards.reward_function("contains", {"word": "sea"})
    got = rewards.call_reward(fn, ["p", "q"], ["the sea", "a cat"], [{"word": "cat"}, {"word": "cat"}])
    assert got == [1.0, 0.0]
    with pytest.raises(ConfigError, match="rl.reward_args.target"):
        rewards.length(["p"], ["a b"], target=0)


def test_a_policy_that_diverges_is_stopped(tiny_llama, tmp_path):
    """A real divergence, not a planted NaN: a huge step overflows the weights, every later update is
    non-finite, and the run stops after train.max_bad_steps such steps instead of finishing as a success."""
    from strop.core.errors import TrainingStopped

    cfg = rl_config(tiny_llama, tmp_path, "grpo", steps=4)
    cfg["optim"] = {"lr": 1e30, "schedule": "constant"}
    cfg["train"]["max_bad_steps"] = 2
    with pytest.raises(
        TrainingStopped, match="2 consecutive steps had only non-finite updates; stopped at step 3"
    ):
        train(cfg, show_progress=False)


@pytest.mark.parametrize("loss", ["grpo", "dr_grpo", "gspo", "cispo", "rloo", "dapo"])
def test_every_rl_loss_trains_through_the_rollout_loop(loss, tiny_llama, tmp_path):
    """Each `rl.loss` runs the skeleton's rollout loop and logs what the report reads (reward, KL, reply
    length) and its clip fraction; DAPO with dynamic sampling logs the share of replies it kept."""
    extra = {"clip_high": 5.0} if loss == "cispo" else {}
    if loss == "dapo":
        extra = {"clip_high": 0.28, "dynamic_sampling": True, "overlong_buffer": 1}
    cfg = rl_config(
        tiny_llama, tmp_path, "grpo", steps=2, loss=loss, prompts_per_step=2, update_epochs=1, **extra
    )
    result = train(cfg, show_progress=False)
    steps = [r for r in metrics(result.run_dir) if "reward" in r]
    assert len(steps) == 2
    assert all("kl" in r and "reply_tokens" in r for r in steps)
    if loss == "dapo":
        assert all(0.0 <= r["kept"] <= 1.0 for r in steps)
        steps = [r for r in steps if r["kept"] > 0]
    assert all(math.isfinite(r["loss"]) and "clipfrac" in r for r in steps)
    report = (result.run_dir / "report.md").read_text()  # the RL section, whichever loss
    assert "Reward (reinforcement learning)" in report and "clip fractions per step" in report


def test_a_weighted_sum_of_rewards_is_declared_in_the_config(tiny_llama, tmp_path):
    """rl.add_rewards: the run's reward is rl.reward + sum of weight x each further reward, each with its
    own arguments; here gsm8k's exact match (the GSM8K extractor) + 0.5 x contains 'answer' - 0.1 x
    length off 3 words."""
    from strop.data.prompts import Prompt
    from strop.recipes.rl import run_reward

    cfg = rl_config(tiny_llama, tmp_path, "grpo", reward="gsm8k")
    cfg["rl"]["add_rewards"] = [
        {"reward": "contains", "weight": 0.5, "args": {"word": "answer"}},
        {"reward": "length", "weight": 0.1, "args": {"target": 3}},
    ]
    rl = load_config(cfg).rl
    reward = run_reward(rl, torch.device("cpu"))
    prompts = [Prompt(str(i), ({"role": "user", "content": "q"},), {"answer": "#### 72"}) for i in range(3)]
    got = reward(prompts, ["The answer is 72", "72", "the answer is 70"])
    # lengths 4, 1, 4 words: length rewards -1/3, -2/3, -1/3
    assert got == pytest.approx([1 + 0.5 - 0.1 / 3, 1 - 0.2 / 3, 0.5 - 0.1 / 3])
    cfg["rl"]["add_rewards"][0]["weight"] = "heavy"
    with pytest.raises(ConfigError, match="rl.add_rewards.0.weight"):
        load_config(cfg)


@pytest.mark.parametrize("loss", ["rloo", "dapo"])
def test_a_variant_stopped_by_a_signal_resumes_exactly(loss, tiny_llama, tmp_path, monkeypatch):
    """Resume = uninterrupted for the reply-level RLOO and for DAPO with dynamic sampling and the
    overlong penalty: what their `prepare` adds is a function of the rollout, drawn again on resume."""
    import os
    import signal

    from safetensors.torch import load_file

    from strop.core.errors import Interrupted
    from strop.training import rl_loop

    extra = {"dynamic_sampling": True, "overlong_buffer": 1} if loss == "dapo" else {}
    cfg = rl_config(
        tiny_llama, tmp_path, "grpo", method="lora", steps=3, loss=loss, prompts_per_step=4, **extra
    )
    real, calls = rl_loop.sample, []

    def sample(*args, **kwargs):  # the signal comes while step 2's replies are sampled
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(rl_loop, "sample", sample)
        with pytest.raises(Interrupted):
            train({**cfg, "name": "cut"}, show_progress=False)
    cut, whole = (train({**cfg, "name": n}, show_progress=False).run_dir for n in ("cut", "whole"))
    runs = [[r for r in metrics(d) if "reward" in r] for d in (cut, whole)]
    assert [r["reward"] for r in runs[0]] == pytest.approx([r["reward"] for r in runs[1]], abs=1e-6)
    assert len(runs[0]) == 3
    wa, wb = (
        {k: v for f in (d / "model").glob("*.safetensors") for k, v in load_file(str(f)).items()}
        for d in (cut, whole)
    )
    assert wa.keys() == wb.keys() and all((wa[k] - wb[k]).abs().max() < 1e-6 for k in wa)


def test_the_shipped_arithmetic_recipe_rewards_the_answer_not_the_explanation():
    """strop configs grpo-arithmetic (the README's RL outcome): its shipped prompts carry their answers,
    train and test share no question, and its reward is 1 exactly when the reply's last number is the
    answer: an explanation cut off before it (the starting model's habit) scores 0."""
    from importlib import resources

    from strop.data.prompts import Prompt
    from strop.recipes.rl import run_reward

    cfg = load_config(str(resources.files("strop.recipes") / "configs" / "grpo-arithmetic.yaml"))
    train_rows, test_rows = (
        [json.loads(line) for line in open(src[0].path)] for src in (cfg.data.train, cfg.data.test)
    )
    assert len(train_rows) == 472 and len(test_rows) == 128
    assert not {r["question"] for r in train_rows} & {r["question"] for r in test_rows}
    for r in train_rows + test_rows:
        a, op, b = r["question"].removeprefix("What is ").removesuffix("?").split()
        assert int(r["answer"]) == (int(a) + int(b) if op == "+" else int(a) - int(b)), r
    reward = run_reward(cfg.rl, torch.device("cpu"))
    prompt = Prompt("1", ({"role": "user", "content": "What is 6 - 4?"},), {"answer": "2"})
    replies = [
        "6 - 4 equals 2.",
        "2",
        "To solve this problem, we need to find the difference between 6 and",
        "6 - 4 = 3",
    ]
    assert reward([prompt] * 4, replies) == [1.0, 1.0, 0.0, 0.0]
