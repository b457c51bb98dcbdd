"""Non-finite losses: such a step is skipped and counted, and repeated ones stop the run with a checkpoint."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import strop.recipes.sft as recipe
from conftest import tiny_config
from strop.core.errors import TrainingStopped
from strop.core.metrics import read_metrics
from strop.methods import sft


def losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


def train(cfg: dict):
    return recipe.train(cfg, show_progress=False)


# -- 4. non-finite losses ------------------------------------------------------------------------------


def poison_loss(monkeypatch, bad_steps) -> dict:
    """Training micro-batch k (1-based; grad_accum 1, so step k) returns a NaN loss when k is bad."""
    real = sft.loss
    calls = {"n": 0}

    def loss(model, batch):
        s, n = real(model, batch)
        if model.training:
            calls["n"] += 1
            if bad_steps(calls["n"]):
                s = s * float("nan")
        return s, n

    monkeypatch.setattr(sft, "loss", loss)
    return calls


def test_a_non_finite_step_is_skipped(tiny_llama, alpaca_file, tmp_path, monkeypatch):
    poison_loss(monkeypatch, lambda k: k == 2)
    cfg = tiny_config(
        tiny_llama,
        alpaca_file,
        tmp_path / "out",
        method={"name": "full"},
        train={"max_steps": 4, "save_every": 1, "keep_last": 10},
    )
    result = train(cfg)
    assert result.metrics["skipped_steps"] == 1
    assert result.metrics["steps"] == 4
    got = losses(result.run_dir)
    assert math.isnan(got[1]) and all(math.isfinite(x) for x in got[:1] + got[2:])

    ck = {s: result.run_dir / "checkpoints" / f"step-{s:06d}" for s in (1, 2, 3)}
    w = {s: load_file(str(p / "trainable.safetensors")) for s, p in ck.items()}
    assert all(torch.equal(w[1][k], w[2][k]) for k in w[1])  # step 2 changed nothing
    assert not all(torch.equal(w[2][k], w[3][k]) for k in w[2])  # step 3 trained again
    opt = {s: load_file(str(p / "optimizer.safetensors")) for s, p in ck.items()}
    assert all(torch.equal(opt[1][k], opt[2][k]) for k in opt[1])  # nor the optimizer state
    assert json.loads((ck[3] / "state.json").read_text())["skipped_steps"] == 1


def test_repeated_non_finite_steps_stop_with_a_checkpoint(tiny_llama, alpaca_file, tmp_path, monkeypatch):
    poison_loss(monkeypatch, lambda k: k >= 2)
    cfg = tiny_config(
        tiny_llama,
        alpaca_file,
        tmp_path / "out",
        method={"name": "full"},
        train={"max_steps": 10, "save_every": 1, "keep_last": 10, "max_bad_steps": 2},
    )
    with pytest.raises(TrainingStopped, match="non-finite"):
        train(cfg)
    root = tmp_path / "out" / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-000001", "step-000002", "step-000003"]
    state = json.loads((root / "step-000003" / "state.json").read_text())
    assert state["step"] == 3 and state["skipped_steps"] == 2 and not state["finished"]
    w1 = load_file(str(root / "step-000001" / "trainable.safetensors"))
    w3 = load_file(str(root / "step-000003" / "trainable.safetensors"))
    assert all(torch.equal(w1[k], w3[k]) and torch.isfinite(w3[k]).all() for k in w1)


def test_a_run_whose_every_step_was_skipped_is_not_a_success(tiny_llama, alpaca_file, tmp_path, monkeypatch):
    import strop
    import strop.methods.sft as sft
    from conftest import tiny_config
    from strop.core.errors import TrainingStopped

    real = sft.loss
    monkeypatch.setattr(sft, "loss", lambda model, batch: (real(model, batch)[0] * float("nan"), 1))
    cfg = tiny_config(tiny_llama, alpaca_file, tmp_path / "runs", train={"max_steps": 2, "max_bad_steps": 5})
    with pytest.raises(TrainingStopped, match="every one of the run's 2 steps .* nothing was learned"):
        strop.train(cfg, show_progress=False)
    assert not (tmp_path / "runs" / "run" / "model").exists()
