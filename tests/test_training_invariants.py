"""Behavioural invariants of the training loop: accumulation equivalence, trainable sets, optimizer
groups and schedules, determinism. Non-finite steps: test_training_nonfinite.py; checkpoints and
resume: test_checkpoint.py."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import strop.recipes.sft as recipe
from conftest import tiny_config, write_jsonl
from strop.core.config import OptimConfig, TrainConfig
from strop.core.metrics import read_metrics
from strop.data.tokenized import TokenizedSet
from strop.methods import sft
from strop.models.trainable import decoder_blocks
from strop.training.loop import fit
from strop.training.loop import fit as loop_fit
from strop.training.optim import build_optimizer, lr_factor

# responses from 1 to 5 sentences long, so micro-batches pad to very different widths
VAR_ROWS = [
    {
        "instruction": f"Explain why the sky is blue, part {k}.",
        "output": " ".join(["The sea is wide and blue and deep."] * (k % 5 + 1)) + f" Yo ho {k}!",
    }
    for k in range(20)
]


@pytest.fixture
def var_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "var.jsonl", VAR_ROWS)


@pytest.fixture(scope="session", params=["llama", "gpt2"])
def nodrop_model(request, tmp_path_factory) -> Path:
    """A copy of the tiny model with every dropout probability set to 0 (GPT-2 defaults to 0.1)."""
    src = request.getfixturevalue(f"tiny_{request.param}")
    out = tmp_path_factory.getbasetemp() / f"nodrop-{request.param}"
    if not out.exists():
        shutil.copytree(src, out)
        cfg = json.loads((out / "config.json").read_text())
        cfg.update(
            {k: 0.0 for k, v in cfg.items() if ("dropout" in k or "pdrop" in k) and isinstance(v, float)}
        )
        (out / "config.json").write_text(json.dumps(cfg))
    return out


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


def train(cfg: dict):
    return recipe.train(cfg, show_progress=False)


@pytest.fixture
def spy_fit(monkeypatch):
    """Records the model the recipe trains, its parameters before training, and which parameters
    reached gradient clipping with a .grad (i.e. received gradients) at every step."""
    seen: dict = {"grad_ids": []}
    real_fit, real_clip = loop_fit, torch.nn.utils.clip_grad_norm_

    def fit_spy(model, *args, **kwargs):
        seen["before"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        seen["model"] = model
        return real_fit(model, *args, **kwargs)

    def clip_spy(params, *args, **kwargs):
        params = list(params)
        seen["grad_ids"].append({id(p) for p in params})
        return real_clip(params, *args, **kwargs)

    monkeypatch.setattr("strop.recipes.skeleton.fit", fit_spy)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_spy)
    return seen


# -- 1. gradient accumulation ------------------------------------------------------------------------


def synthetic_set(vocab: int, seed: int = 0) -> TokenizedSet:
    rng = np.random.default_rng(seed)
    lengths = [5, 40, 12, 33, 7, 21, 28, 16]
    ids, trained = [], []
    for n in lengths:
        ids.append(rng.integers(4, vocab, size=n).astype(np.int32))
        mask = np.zeros(n, dtype=bool)
        mask[max(1, n // 3) :] = True  # a prompt, then the response
        trained.append(mask)
    return TokenizedSet(ids, trained, [str(i) for i in range(len(ids))])


def one_sgd_step(
    model_dir: Path, ts: TokenizedSet, batch_size: int, grad_accum: int, pad_id: int, run_dir: Path
) -> tuple[float, dict]:
    """Run the real loop for one plain-SGD step with lr 1: the weight change is minus the gradient."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    run_dir.mkdir(parents=True)
    fit(
        model,
        sft.SFT(),
        ts,
        None,
        TrainConfig(batch_size=batch_size, grad_accum=grad_accum, max_steps=1, seed=0),
        OptimConfig(name="sgd", lr=1.0, momentum=0.0, grad_clip=None, schedule="constant"),
        run_dir,
        pad_id,
        torch.device("cpu"),
        show_progress=False,
    )
    grads = {n: before[n] - p.detach() for n, p in model.named_parameters()}
    return losses(run_dir)[0], grads


def test_accumulation_gives_the_same_loss_and_gradients(nodrop_model, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    ts = synthetic_set(len(tokenizer))
    pad = tokenizer.pad_token_id
    results = {
        (b, a): one_sgd_step(nodrop_model, ts, b, a, pad, tmp_path / f"{b}x{a}")
        for b, a in [(8, 1), (4, 2), (2, 4), (1, 8)]
    }

    # reference: every example alone (no padding at all), token losses summed over all label tokens
    model = AutoModelForCausalLM.from_pretrained(nodrop_model, dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, mask in zip(ts.ids, ts.trained, strict=True):
            x = torch.from_numpy(ids.astype(np.int64))[None]
            labels = torch.where(torch.from_numpy(mask)[None], x, -100)
            s, n = sft.loss(model, {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": labels})
            total, count = total + float(s), count + n
    reference = total / count

    loss_8, grads_8 = results[(8, 1)]
    assert loss_8 == pytest.approx(reference, abs=1e-5)
    assert any(float(g.abs().max()) > 1e-4 for g in grads_8.values())  # the step did train
    for (b, a), (loss, grads) in results.items():
        assert loss == pytest.approx(loss_8, abs=1e-5), (b, a)
        for name, g in grads.items():
            assert torch.allclose(g, grads_8[name], atol=1e-5, rtol=0), f"{b}x{a}: gradient of {name}"


def test_accumulation_gives_the_same_run(nodrop_model, var_file, tmp_path):
    runs = {}
    for b, a in [(8, 1), (2, 4), (4, 2)]:
        cfg = tiny_config(
            nodrop_model,
            var_file,
            tmp_path / f"{b}x{a}",
            method={"name": "full"},
            optim={"lr": 1e-3},
            train={"batch_size": b, "grad_accum": a, "max_steps": 3},
        )
        cfg["data"]["max_length"] = 96
        records = [r for r in read_metrics(train(cfg).run_dir) if "loss" in r]
        runs[(b, a)] = ([r["loss"] for r in records], [r["label_tokens"] for r in records])
    want_loss, want_tokens = runs[(8, 1)]
    assert len(want_loss) == 3
    for key, (got_loss, got_tokens) in runs.items():
        assert got_tokens == want_tokens, key  # the same examples make up each optimizer step
        assert got_loss == pytest.approx(want_loss, abs=1e-5), key


# -- 6. what trains ------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["full", "freeze", "lora"])
def test_only_the_trainable_set_changes(method, tiny_model, alpaca_file, tmp_path, spy_fit):
    cfg = tiny_config(
        tiny_model,
        alpaca_file,
        tmp_path / "out",
        method={"name": method, "freeze": {"train_last_n_blocks": 1}, "lora": {"r": 4, "dropout": 0.0}},
        train={"max_steps": 3},
    )
    train(cfg)
    model, before = spy_fit["model"], spy_fit["before"]
    after = dict(model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}

    if method == "full":
        expected = set(before)
    elif method == "freeze":
        prefix, blocks = decoder_blocks(model)
        last = f"{prefix}.{len(blocks) - 1}."
        expected = {n for n in before if n.startswith(last)}
        assert expected and len(expected) < len(before)
    else:
        expected = {n for n in before if "lora_" in n}
        assert expected and len(expected) < len(before)
    assert changed == expected
    assert {n for n, p in after.items() if p.requires_grad} == expected

    # frozen parameters never got a gradient: only trainable ones reached clipping with a .grad
    trainable_ids = {id(p) for p in after.values() if p.requires_grad}
    assert len(spy_fit["grad_ids"]) == 3
    assert all(ids == trainable_ids for ids in spy_fit["grad_ids"])
    assert all(p.grad is None for p in after.values() if not p.requires_grad)


# -- 7. optimizer and schedules ------------------------------------------------------------------------


def test_no_weight_decay_on_biases_and_norms(tiny_gpt2, tiny_llama):
    from transformers import AutoModelForCausalLM

    for path in (tiny_gpt2, tiny_llama):
        model = AutoModelForCausalLM.from_pretrained(path)
        opt = build_optimizer(model, "adamw", 0.1, 0.5, (0.9, 0.999), 0.0)
        decay_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
        named = dict(model.named_parameters())
        assert set(decay_of) == {id(p) for p in named.values()}
        for name, p in named.items():
            no_decay = name.endswith("bias") or "norm" in name or ".ln_" in name or p.ndim < 2
            assert decay_of[id(p)] == (0.0 if no_decay else 0.5), name
        assert any(name.endswith("bias") for name in named) or path == tiny_llama

        # behaviour: with zero gradients AdamW moves only by decoupled decay, w <- w * (1 - lr * wd)
        before = {n: p.detach().clone() for n, p in named.items()}
        for p in named.values():
            p.grad = torch.zeros_like(p)
        opt.step()
        for name, p in named.items():
            expected = before[name] if p.ndim < 2 else before[name] * (1 - 0.1 * 0.5)
            assert torch.allclose(p.detach(), expected, atol=1e-7, rtol=1e-6), name


def test_schedule_values_by_hand():
    # warmup 4 of 14 steps: (s + 1) / 5, then the decay runs over the remaining 10 steps
    for schedule in ("constant", "linear", "cosine"):
        assert [lr_factor(s, 14, schedule, 4) for s in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])
        assert lr_factor(4, 14, schedule, 4) == pytest.approx(1.0)
    assert [lr_factor(s, 14, "constant", 4) for s in range(4, 14)] == [1.0] * 10
    assert [lr_factor(s, 10, "constant", 0) for s in range(10)] == [1.0] * 10
    assert lr_factor(9, 14, "linear", 4) == pytest.approx(0.5)
    assert lr_factor(13, 14, "linear", 4) == pytest.approx(0.1)
    assert lr_factor(9, 14, "cosine", 4) == pytest.approx(0.5)
    assert lr_factor(6, 14, "cosine", 4) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.2)))
    assert lr_factor(13, 14, "cosine", 4) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.9)))
    # monotone decay after warmup
    for schedule in ("linear", "cosine"):
        values = [lr_factor(s, 14, schedule, 4) for s in range(4, 14)]
        assert all(a > b for a, b in zip(values, values[1:], strict=False))


@pytest.mark.parametrize(
    "schedule,expected",
    [
        (
            "cosine",
            [
                1 / 3,
                2 / 3,
                1.0,
                0.5 * (1 + math.cos(math.pi / 4)),
                0.5,
                0.5 * (1 + math.cos(3 * math.pi / 4)),
            ],
        ),
        ("linear", [1 / 3, 2 / 3, 1.0, 0.75, 0.5, 0.25]),
        ("constant", [1 / 3, 2 / 3, 1.0, 1.0, 1.0, 1.0]),
    ],
)
def test_the_loop_uses_the_schedule(schedule, expected, tiny_llama, alpaca_file, tmp_path):
    cfg = tiny_config(
        tiny_llama,
        alpaca_file,
        tmp_path / "out",
        optim={"lr": 0.1, "schedule": schedule, "warmup_steps": 2},
        train={"max_steps": 6},
    )
    logged = [r["lr"] for r in read_metrics(train(cfg).run_dir) if "lr" in r]
    assert logged == pytest.approx([0.1 * f for f in expected])


def test_sgd_momentum(tiny_llama, alpaca_file, tmp_path):
    from transformers import AutoModelForCausalLM

    # the update rule: buf = m * buf + g, w -= lr * buf
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    opt = build_optimizer(model, "sgd", 0.1, 0.0, (0.9, 0.999), 0.9)
    p = model.get_input_embeddings().weight
    w0 = p.detach().clone()
    g = torch.randn_like(p)
    for _ in range(2):
        p.grad = g.clone()
        opt.step()
    assert torch.allclose(p.detach(), w0 - 0.1 * g - 0.1 * 1.9 * g, atol=1e-6)

    # and it trains through the loop, with the momentum buffers checkpointed
    cfg = tiny_config(
        tiny_llama,
        alpaca_file,
        tmp_path / "out",
        method={"name": "full"},
        optim={"name": "sgd", "lr": 0.5, "momentum": 0.9},
        train={"max_steps": 8},
    )
    result = train(cfg)
    got = losses(result.run_dir)
    assert all(math.isfinite(x) for x in got)
    assert got[-1] < got[0] - 0.5
    ckpt = sorted((result.run_dir / "checkpoints").iterdir())[-1]
    opt_state = load_file(str(ckpt / "optimizer.safetensors"))
    buffers = [v for k, v in opt_state.items() if k.endswith(".momentum_buffer")]
    assert buffers and any(float(b.abs().max()) > 0 for b in buffers)


# -- 8. determinism -------------------------------------------------------------------------------------


def test_identical_runs_are_identical(tiny_model, alpaca_file, tmp_path):
    runs = []
    for name in ("a", "b"):
        cfg = tiny_config(
            tiny_model,
            alpaca_file,
            tmp_path / name,
            method={"lora": {"r": 4, "alpha": 8, "dropout": 0.2}},
            train={"max_steps": 4},
        )
        result = train(cfg)
        runs.append((losses(result.run_dir), load_file(str(result.model_dir / "adapter_model.safetensors"))))
    (loss_a, w_a), (loss_b, w_b) = runs
    assert len(loss_a) == 4 and loss_a == loss_b
    assert w_a.keys() == w_b.keys() and all(torch.equal(w_a[k], w_b[k]) for k in w_a)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_gradient_checkpointing_gives_the_same_run(method, nodrop_model, alpaca_file, tmp_path, spy_fit):
    runs = []
    for checkpointing in (False, True):
        cfg = tiny_config(
            nodrop_model,
            alpaca_file,
            tmp_path / f"gc-{checkpointing}",
            method={"name": method},
            train={"max_steps": 2, "gradient_checkpointing": checkpointing},
        )
        runs.append(losses(train(cfg).run_dir))
        model = spy_fit["model"]
        on = (
            model.is_activation_checkpointing
            if hasattr(model, "is_activation_checkpointing")
            else model.is_gradient_checkpointing
        )
        assert on == checkpointing
    assert len(runs[0]) == 2 and runs[1] == pytest.approx(runs[0], abs=1e-6)
