"""Checkpoints and what a run leaves behind: resume equals an uninterrupted run, pruning, no pickle,
atomic writes, early stopping to the best weights, and the exported LoRA adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import strop
import strop.recipes.sft as recipe
import strop.training.checkpoint as checkpoint
from conftest import tiny_config
from strop.core.errors import StropError
from strop.core.metrics import read_metrics
from strop.methods import sft
from strop.training.loop import fit as loop_fit

REAL_LOSS = sft.loss


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


def train(cfg: dict):
    return recipe.train(cfg, show_progress=False)


def checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def count_training_steps(monkeypatch, interrupt_at: int | None = None) -> dict:
    """Counts training micro-batches (grad_accum 1: steps); raises KeyboardInterrupt on number `interrupt_at`."""
    calls = {"n": 0}

    def loss(model, batch):
        if model.training:
            calls["n"] += 1
            if calls["n"] == interrupt_at:
                raise KeyboardInterrupt
        return REAL_LOSS(model, batch)

    monkeypatch.setattr(sft, "loss", loss)
    return calls


def assert_same_tensors(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol, rtol=0), k


# -- 2. resume ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arch,method",
    [
        (
            "llama",
            {"name": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.3}},
        ),  # LoRA dropout: RNG matters
        ("gpt2", {"name": "full"}),  # AdamW moments for every weight; GPT-2's own dropout is 0.1
    ],
)
def test_resumed_run_equals_uninterrupted_run(arch, method, request, alpaca_file, tmp_path, monkeypatch):
    model_dir = request.getfixturevalue(f"tiny_{arch}")
    weights = "adapter_model.safetensors" if method["name"] == "lora" else "model.safetensors"

    whole = train(
        tiny_config(
            model_dir, alpaca_file, tmp_path / "whole", method=method, train={"max_steps": 6, "save_every": 3}
        )
    )
    expected = losses(whole.run_dir)
    assert len(expected) == 6

    cfg = tiny_config(
        model_dir, alpaca_file, tmp_path / "cut", method=method, train={"max_steps": 6, "save_every": 3}
    )
    count_training_steps(monkeypatch, interrupt_at=5)  # dies during step 5; the last checkpoint is step 3
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    run_dir = tmp_path / "cut" / "run"
    assert checkpoints(run_dir) == ["step-000003"]
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4]  # step 4 was logged, never saved

    calls = count_training_steps(monkeypatch)
    resumed = train(cfg)
    assert calls["n"] == 3  # it continued from step 3 instead of starting over
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert losses(run_dir) == pytest.approx(expected, abs=1e-6, rel=0)
    assert resumed.metrics["val_loss"] == pytest.approx(whole.metrics["val_loss"], abs=1e-6)
    assert_same_tensors(
        load_file(str(resumed.model_dir / weights)), load_file(str(whole.model_dir / weights)), atol=1e-6
    )

    # a finished run is not trained again
    with pytest.raises(StropError, match="finished"):
        train(cfg)


# -- 3. checkpoint files -----------------------------------------------------------------------------


def test_keeps_last_k_and_best_and_never_pickles(tiny_llama, alpaca_file, tmp_path):
    # min_delta 10: only the first evaluation counts as an improvement, so step 1 stays the best
    cfg = tiny_config(
        tiny_llama,
        alpaca_file,
        tmp_path / "out",
        method={"name": "full"},
        train={
            "max_steps": 5,
            "save_every": 1,
            "keep_last": 2,
            "eval_every": 1,
            "early_stopping": {"min_delta": 10.0},
        },
    )
    result = train(cfg)
    assert result.metrics["best_step"] == 1 and result.metrics["steps"] == 5
    assert checkpoints(result.run_dir) == ["step-000001", "step-000004", "step-000005"]

    for ckpt in (result.run_dir / "checkpoints").iterdir():
        files = {p.name for p in ckpt.iterdir()}
        assert files == {
            "trainable.safetensors",
            "optimizer.safetensors",
            "optimizer.json",
            "rng.safetensors",
            "state.json",
        }
        for name in files:
            head = (ckpt / name).read_bytes()[:2]
            assert head[:1] != b"\x80" and head != b"PK", f"{ckpt.name}/{name} looks like a pickle/torch.save"
        assert json.loads((ckpt / "state.json").read_text())["step"] == int(ckpt.name.split("-")[1])
    pickles = [p for p in result.run_dir.rglob("*") if p.suffix in {".bin", ".pt", ".pth", ".pkl", ".pickle"}]
    assert pickles == []


def test_failed_save_leaves_previous_checkpoint(tiny_llama, alpaca_file, tmp_path, monkeypatch):
    real_save = checkpoint.save_file
    calls = {"n": 0}

    def failing_save(tensors, filename, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # second file of the step-2 checkpoint: write half of it, then fail
            real_save(tensors, filename, *args, **kwargs)
            data = Path(filename).read_bytes()
            Path(filename).write_bytes(data[: len(data) // 2])
            raise OSError("No space left on device")
        return real_save(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", failing_save)
    cfg = tiny_config(
        tiny_llama,
        alpaca_file,
        tmp_path / "out",
        method={"name": "full"},
        train={"max_steps": 3, "save_every": 1, "keep_last": 1},
    )
    with pytest.raises(OSError, match="No space left"):
        train(cfg)
    run_dir = tmp_path / "out" / "run"
    assert checkpoints(run_dir) == ["step-000001"]  # no step-000002, no temporary folder left behind
    ckpt = run_dir / "checkpoints" / "step-000001"
    assert json.loads((ckpt / "state.json").read_text())["step"] == 1
    for name in ("trainable.safetensors", "optimizer.safetensors", "rng.safetensors"):
        assert load_file(str(ckpt / name))

    monkeypatch.setattr(checkpoint, "save_file", real_save)
    result = train(cfg)  # resumes from the intact checkpoint
    assert result.metrics["steps"] == 3
    assert checkpoints(run_dir) == ["step-000003"]


# -- 5. early stopping -------------------------------------------------------------------------------


def test_early_stopping_exports_the_best_weights(tiny_llama, alpaca_file, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(
        tiny_llama,
        alpaca_file,
        tmp_path / "out",
        method={"name": "full"},
        train={"max_steps": 20, "eval_every": 1, "early_stopping": {"patience": 2, "min_delta": 10.0}},
    )
    result = train(cfg)
    m = result.metrics
    assert m["stopped_early"] and m["steps"] == 3 and m["best_step"] == 1
    assert [r["step"] for r in read_metrics(result.run_dir) if "val_loss" in r] == [1, 2, 3]
    assert checkpoints(result.run_dir) == ["step-000001", "step-000003"]
    assert json.loads((result.run_dir / "checkpoints" / "step-000003" / "state.json").read_text())["finished"]

    exported = dict(AutoModelForCausalLM.from_pretrained(result.model_dir).named_parameters())
    best = load_file(str(result.run_dir / "checkpoints" / "step-000001" / "trainable.safetensors"))
    last = load_file(str(result.run_dir / "checkpoints" / "step-000003" / "trainable.safetensors"))
    assert best.keys() == exported.keys()
    assert all(torch.equal(exported[k].detach(), best[k]) for k in best)
    assert not all(torch.equal(best[k], last[k]) for k in best)  # the best is not simply the last

    # and with a plain improving run nothing stops early
    plain = train(
        tiny_config(
            tiny_llama,
            alpaca_file,
            tmp_path / "plain",
            method={"name": "full"},
            train={"max_steps": 4, "eval_every": 1, "early_stopping": {"patience": 2}},
        )
    )
    assert not plain.metrics["stopped_early"] and plain.metrics["steps"] == 4


# -- 9. the exported adapter and the public API -----------------------------------------------------


def test_saved_adapter_reproduces_the_trained_model(
    tiny_model, alpaca_file, tmp_path, monkeypatch, tokenizer
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    captured = {}
    real_fit = loop_fit

    def fit_spy(model, *args, **kwargs):
        captured["model"] = model
        return real_fit(model, *args, **kwargs)

    monkeypatch.setattr("strop.recipes.skeleton.fit", fit_spy)
    cfg = tiny_config(
        tiny_model,
        alpaca_file,
        tmp_path / "out",
        method={"lora": {"r": 4, "alpha": 8, "dropout": 0.1}},
        train={"max_steps": 3},
    )
    assert hasattr(strop, "train")
    result = strop.train(cfg, show_progress=False)

    assert result.run_dir == tmp_path / "out" / "run" and result.model_dir == result.run_dir / "model"
    assert (result.model_dir / "adapter_config.json").is_file()
    assert (result.model_dir / "adapter_model.safetensors").is_file()
    m = result.metrics
    assert m["steps"] == 3 and m["skipped_steps"] == 0 and m["best_step"] == 3
    assert m["loss"] == pytest.approx(losses(result.run_dir)[-1])
    assert m["val_loss"] == m["best_val_loss"] and m["trainable_parameters"] < m["total_parameters"]
    saved = json.loads((result.run_dir / "result.json").read_text())
    assert saved["model_dir"] == str(result.model_dir) and saved["metrics"]["steps"] == 3

    trained = captured["model"].eval()
    loaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model), str(result.model_dir)
    ).eval()
    ids = torch.tensor([tokenizer("What is 3 times 4? Arr! 3 times 4 be 12, matey.")["input_ids"]])
    with torch.no_grad():
        want = trained(input_ids=ids).logits
        got = loaded(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    assert not torch.allclose(base, want, atol=1e-4)  # the adapter is not a no-op
