"""No setting silently ignored. Every task builds its model the same way (models/build.py), so gradient
checkpointing and the precision policy (float32 weights that train, the forward autocast to model.dtype)
reach SFT, classification, reward, DPO, KTO, PPO and GRPO alike; and every other setting of core/task_settings.py
is, for each task, either used or refused by name."""

from __future__ import annotations

import re

import pytest
import torch

import strop
from strop.core.config import load_config
from strop.core.errors import ConfigError
from strop.core.metrics import read_metrics
from strop.core.task_settings import HONOURED, TASKS
from test_rl import rl_config
from test_signals import classification, dpo, kto, reward, sft_config


def _sft(model, tmp_path):
    return sft_config(model, tmp_path, "run")


def _grpo(model, tmp_path):
    return rl_config(model, tmp_path, "grpo", steps=2)


def _ppo(model, tmp_path):
    return rl_config(model, tmp_path, "ppo", steps=2)


TASK_CONFIGS = {
    "sft": _sft,
    "classification": classification,
    "reward": reward,
    "dpo": dpo,
    "kto": kto,
    "grpo": _grpo,
    "ppo": _ppo,
}


@pytest.mark.parametrize("task", list(TASK_CONFIGS))
def test_checkpointing_and_precision_reach_every_task(task, request, tmp_path, monkeypatch):
    from strop.training import loop, rl_loop

    model_dir = request.getfixturevalue("tiny_bert" if task == "classification" else "tiny_llama")
    cfg = TASK_CONFIGS[task](model_dir, tmp_path)
    cfg.update(name="amp", method={"name": "full"})
    cfg["model"] = {**cfg["model"], "dtype": "bfloat16", "device": "cpu"}
    cfg["train"] = {**cfg["train"], "max_steps": 2, "gradient_checkpointing": True}
    seen = {}

    def spy(real):
        def fit(model, *args, **kwargs):
            # fit takes the dtype; the rollout loop runs inside the recipe's autocast context
            active = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
            seen["autocast"] = kwargs.get("autocast_dtype") or active
            net = getattr(model, "backbone", model)
            seen["checkpointing"] = net.is_gradient_checkpointing
            out = real(model, *args, **kwargs)
            seen["dtypes"] = {p.dtype for p in model.parameters() if p.requires_grad}
            return out

        return fit

    rl = task in ("grpo", "ppo")
    target = "strop.recipes.skeleton.fit_rl" if rl else "strop.recipes.skeleton.fit"
    monkeypatch.setattr(target, spy(rl_loop.fit_rl if rl else loop.fit))
    strop.train(cfg, show_progress=False)
    assert seen["autocast"] == torch.bfloat16
    assert seen["checkpointing"] is True
    assert seen["dtypes"] == {torch.float32}  # the weights that train stay float32


# a value other than the default for every setting of the table
SAMPLES = {
    "data.mixture": {"examples": 8},
    "data.curriculum": {"difficulty": "length"},
    "data.augment": {"copies": 2},
    "data.cache_dir": "/tmp/strop-cache",
    "data.train_on_prompt": True,
    "data.template": "chatml",
    "data.system_prompt": "Be brief.",
    "data.skip_bad_rows": True,
    "train.grad_accum": 2,
    "train.log_every": 5,
    "train.early_stopping": {"patience": 2},
    "model.adapter": "continue",
    "method.freeze.train_lm_head": True,
    "eval.batch_size": 2,
    "eval.metrics": ["rouge_l"],
    "eval.extract": "last_number",
    "eval.max_new_tokens": 8,
    "eval.temperature": 0.5,
    "eval.top_p": 0.5,
    "eval.stop": ["\n"],
    "eval.base": False,
    "eval.kshot": 1,
    "eval.forgetting": False,
    "eval.reference_text": "ref.txt",
    "eval.forgetting_threshold": 0.5,
    "eval.bootstrap": 200,
    "eval.samples": 2,
    "distill": {"teacher": "teacher-run"},
    "judge": {"endpoint": "http://127.0.0.1:9/v1"},
    "train.memory_limit": "8GB",
    "dpo.loss": "ipo",
    "dpo.beta": 0.5,
    "dpo.label_smoothing": 0.1,
    "dpo.simpo_gamma": 1.0,
    "kto.beta": 0.5,
    "kto.desirable_weight": 1.5,
    "kto.undesirable_weight": 0.5,
    "rl.value_clip": 0.5,
    "rl.vf_coef": 0.5,
    "rl.gamma": 0.9,
    "rl.lam": 0.9,
    "rl.loss": "grpo",
    "rl.clip_high": 0.28,
    "rl.dynamic_sampling": True,
    "rl.overlong_buffer": 4,
    "classify.labels": ["a", "b"],
    "classify.class_weights": "balanced",
    "classify.explain": 0,
    "classify.pooling": "mean",
    "classify.head_layers": [8],
    "classify.head_dropout": 0.3,
    "reward_model.rating_field": "score",
}


def _base(kind: str) -> dict:
    task = "reward" if kind == "reward-ratings" else kind
    cfg = {"task": task, "data": {"train": [{"path": "rows.jsonl", "ratio": 1.0}]}}
    if task in ("ppo", "grpo"):
        cfg["rl"] = {"reward": "length", "group_size": 2}
    if kind == "reward-ratings":
        cfg["reward_model"] = {"target": "ratings"}
    return cfg


def _with(cfg: dict, key: str, value) -> dict:
    *sections, name = key.split(".")
    node = cfg
    for s in sections:
        node = node.setdefault(s, {})
    node[name] = value
    if key == "dpo.simpo_gamma":
        cfg["dpo"]["loss"] = "simpo"  # the one loss it belongs to
    if key == "dpo.label_smoothing":
        cfg["dpo"]["loss"] = "sigmoid"
    if key == "model.adapter":
        cfg.setdefault("method", {})["name"] = "lora"
    if key.startswith("method.freeze"):
        cfg.setdefault("method", {})["name"] = "freeze"
    return cfg


def test_the_table_has_a_sample_for_every_setting():
    assert set(SAMPLES) == set(HONOURED)


@pytest.mark.parametrize("kind", TASKS)
@pytest.mark.parametrize("key", sorted(HONOURED))
def test_every_task_honours_or_refuses_every_setting(key, kind):
    """The table's promise, pair by pair: the config loads where the task's code path uses the setting
    (what it then does is tested with each feature), and is refused naming the key and the task where
    it would be ignored."""
    cfg = _with(_base(kind), key, SAMPLES[key])
    if key != "data.mixture":
        cfg["data"]["mixture"] = None
        del cfg["data"]["train"][0]["ratio"]
    if kind in HONOURED[key]:
        load_config(cfg)
    elif key.startswith("rl.") and kind not in ("ppo", "grpo"):  # the rl section is theirs alone
        cfg["rl"]["reward"] = "length"
        task = cfg["task"]
        with pytest.raises(
            ConfigError, match=rf"rl: the rl section is for task ppo or grpo, got task: {task}"
        ):
            load_config(cfg)
    else:
        with pytest.raises(ConfigError, match=rf"{re.escape(key)}: task {kind} does not use it"):
            load_config(cfg)


@pytest.mark.parametrize("kind", TASKS)
def test_per_source_templates_formats_and_ratios(kind):
    cfg = _base(kind)
    del cfg["data"]["train"][0]["ratio"]
    cfg["data"]["test"] = [{"path": "t.jsonl", "template": "chatml"}]
    with pytest.raises(ConfigError, match=r"data.test.0.template: task .*test sources are scored"):
        load_config(cfg)
    cfg["data"]["test"] = []
    cfg["data"]["train"][0]["template"] = "chatml"
    if kind == "sft":
        load_config(cfg)
    else:
        with pytest.raises(ConfigError, match=rf"data.train.0.template: task {kind} does not use it"):
            load_config(cfg)
    del cfg["data"]["train"][0]["template"]
    cfg["data"]["train"][0]["format"] = "alpaca"
    if kind in ("reward-ratings", "ppo", "grpo"):
        with pytest.raises(ConfigError, match=rf"data.train.0.format: task {kind} does not use it"):
            load_config(cfg)
    del cfg["data"]["train"][0]["format"]
    cfg["data"]["train"][0]["ratio"] = 2.0
    with pytest.raises(
        ConfigError, match="data.train.0.ratio: a ratio weighs training sources in a data.mixture"
    ):
        load_config(cfg)


def test_continuing_an_adapter_needs_a_strop_run(tiny_llama, tmp_path):
    cfg = sft_config(tiny_llama, tmp_path, "run")
    cfg["model"]["adapter"] = "continue"
    with pytest.raises(ConfigError, match="model.adapter: continue .* is not a strop run"):
        strop.train(cfg, show_progress=False)


def test_grpo_continuing_an_adapter_starts_at_zero_kl_from_it(tiny_llama, tmp_path):
    """The reference of a continued adapter is the policy it starts from (the earlier run's adapter), not
    the bare base that switching the adapter off would give."""
    first = strop.train(
        {**sft_config(tiny_llama, tmp_path, "first"), "optim": {"lr": 5e-2}}, show_progress=False
    )
    cfg = rl_config(tiny_llama, tmp_path, "grpo", method="lora", steps=1, kl_coef=0.1)
    cfg["model"] = {"name": str(first.run_dir), "adapter": "continue"}
    cfg["method"] = {"name": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}
    result = strop.train({**cfg, "name": "grpo-continued"}, show_progress=False)
    (step,) = [r for r in read_metrics(result.run_dir) if "kl" in r]
    assert step["kl"] == pytest.approx(0.0, abs=1e-6)
