"""Every task builds its model the same way (models/build.py): gradient checkpointing and the precision
policy (float32 weights that train, the forward autocast to model.dtype) reach SFT, classification,
reward, DPO and GRPO alike, where once they reached SFT only."""

from __future__ import annotations

import pytest
import torch

import strop
from test_rl import rl_config
from test_signals import classification, dpo, reward, sft_config


def _sft(model, tmp_path):
    return sft_config(model, tmp_path, "run")


def _grpo(model, tmp_path):
    return rl_config(model, tmp_path, "grpo", steps=2)


TASKS = {"sft": _sft, "classification": classification, "reward": reward, "dpo": dpo, "grpo": _grpo}


@pytest.mark.parametrize("task", list(TASKS))
def test_checkpointing_and_precision_reach_every_task(task, request, tmp_path, monkeypatch):
    from strop.training import loop, rl_loop

    model_dir = request.getfixturevalue("tiny_bert" if task == "classification" else "tiny_llama")
    cfg = TASKS[task](model_dir, tmp_path)
    cfg.update(name="amp", method={"name": "full"})
    cfg["model"] = {**cfg["model"], "dtype": "bfloat16", "device": "cpu"}
    cfg["train"] = {**cfg["train"], "max_steps": 2, "gradient_checkpointing": True}
    seen = {}

    def spy(real):
        def fit(model, *args, **kwargs):
            seen["autocast"] = kwargs.get("autocast_dtype")
            net = getattr(model, "backbone", model)
            seen["checkpointing"] = net.is_gradient_checkpointing
            out = real(model, *args, **kwargs)
            seen["dtypes"] = {p.dtype for p in model.parameters() if p.requires_grad}
            return out

        return fit

    target = "strop.recipes.rl.fit_rl" if task == "grpo" else f"strop.recipes.{_recipe(task)}.fit"
    monkeypatch.setattr(target, spy(rl_loop.fit_rl if task == "grpo" else loop.fit))
    strop.train(cfg, show_progress=False)
    assert seen["autocast"] == torch.bfloat16
    assert seen["checkpointing"] is True
    assert seen["dtypes"] == {torch.float32}  # the weights that train stay float32


def _recipe(task: str) -> str:
    return {"sft": "sft", "classification": "classify", "reward": "preference", "dpo": "preference"}[task]
