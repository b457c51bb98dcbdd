"""PEFT's LoRA variants as method.lora options: DoRA, rsLoRA, the gaussian / PiSSA / OLoRA starts and
LoRA+ (lr_ratio). Each trains; the saved adapter over the ORIGINAL base equals the merged model and the
GGUF export; a PiSSA or OLoRA start (which moves part of each base weight into the adapter) is saved
converted to plain LoRA of twice the rank, checked against the in-memory model it came from."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import build_model, build_tokenizer, run_cli, tiny_config
from strop.core.config import RunConfig
from strop.models.trainable import apply_lora, save_adapter_or_model
from strop.recipes.run import train
from strop.training.optim import build_optimizer, set_lr
from test_export_gguf import TOLERANCE, max_logit_diff, read_back
from test_models import logits

F32 = torch.float32
VARIANTS = {
    "dora": {"use_dora": True},
    "rslora": {"use_rslora": True},
    "gaussian": {"init": "gaussian"},
    "pissa": {"init": "pissa"},
    "olora": {"init": "olora"},
    "lora+": {"lr_ratio": 16.0},
}


@pytest.mark.parametrize("name", ["dora", "rslora", "pissa", "olora"])  # gaussian, lora+: plain LoRA on disk
def test_each_variant_trains_and_its_adapter_merged_and_gguf_agree(
    name, tiny_llama, alpaca_file, tmp_path, capsys
):
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, **VARIANTS[name]}
    run = train(
        tiny_config(tiny_llama, alpaca_file, tmp_path / "runs", method={"name": "lora", "lora": lora}),
        show_progress=False,
    )
    saved = json.loads((run.model_dir / "adapter_config.json").read_text())
    assert saved["use_dora"] == lora.get("use_dora", False)
    assert saved["use_rslora"] == lora.get("use_rslora", False)
    converted = lora.get("init") in ("pissa", "olora")
    assert saved["r"] == (8 if converted else 4)  # [A | A0], [B | -B0]
    assert saved["init_lora_weights"] in (True, "gaussian")  # loading it never decomposes the base again
    tok = AutoTokenizer.from_pretrained(run.model_dir)
    adapted = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=F32), run.model_dir
    ).eval()
    want = logits(adapted, tok)
    with adapted.disable_adapter():
        base = logits(adapted, tok)
    assert (want - base).abs().max() > 1e-3, "training did not move the model; the test proves nothing"
    merged_dir = tmp_path / "merged"
    assert run_cli(["-q", "merge", str(run.run_dir), "--out", str(merged_dir)], capsys)[0] == 0
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=F32).eval()
    assert (logits(merged, tok) - want).abs().max() < 1e-5
    gguf = tmp_path / "ship" / "m.gguf"
    rc, _, err = run_cli(["-q", "export", str(run.run_dir), "--quantize", "f16", "--out", str(gguf)], capsys)
    assert rc == 0, err
    back, _ = read_back(gguf)
    assert max_logit_diff(merged, back, build_tokenizer()) < TOLERANCE["f16"]


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_mutating_start_is_saved_as_plain_lora_over_the_original_weights(init, tmp_path):
    tok = build_tokenizer()
    torch.manual_seed(0)
    original = build_model("llama", len(tok)).eval()
    original.save_pretrained(tmp_path / "base")
    model = apply_lora(build_model_copy(tmp_path / "base"), 4, 8, 0.0, "all-linear", init=init)
    before = dict(original.named_parameters())
    moved = [
        n
        for n, p in model.get_base_model().named_parameters()
        if ".base_layer." in n and not torch.equal(p, before[n.replace(".base_layer.", ".")])
    ]
    assert moved, "the start did not move the base weights; the conversion would be vacuous"
    with torch.no_grad():  # stands in for training: every adapter matrix moves
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn_like(p) * 0.05)
    trained = logits(model.eval(), tok)
    save_adapter_or_model(model, tmp_path / "adapter")
    back = PeftModel.from_pretrained(build_model_copy(tmp_path / "base"), tmp_path / "adapter").eval()
    assert (logits(back, tok) - trained).abs().max() < 1e-4
    # the negative control: the adapter saved as is, read as W + BA the way llama.cpp, vLLM and a merge
    # by another tool read an adapter (PEFT itself would decompose the base again on loading)
    model.save_pretrained(tmp_path / "unconverted", safe_serialization=True)
    config = tmp_path / "unconverted" / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "init_lora_weights": True}))
    wrong = PeftModel.from_pretrained(build_model_copy(tmp_path / "base"), tmp_path / "unconverted").eval()
    assert (logits(wrong, tok) - trained).abs().max() > 1e-3
    assert (logits(model, tok) - trained).abs().max() < 1e-6  # the saving left the live model as it was


def build_model_copy(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=F32)


def test_lora_plus_gives_the_b_matrices_lr_times_the_ratio(tmp_path):
    tok = build_tokenizer()
    model = apply_lora(build_model("llama", len(tok)), 4, 8, 0.0, "all-linear")
    opt = build_optimizer(model, "adamw", 1e-3, 0.01, (0.9, 0.999), 0.9, {"lora_B": 16.0})
    set_lr(opt, 2e-4)
    ids = {id(p) for n, p in model.named_parameters() if "lora_B" in n}
    for group in opt.param_groups:
        is_b = {id(p) in ids for p in group["params"]}
        assert len(is_b) == 1  # a group is all B or no B
        assert group["lr"] == pytest.approx(2e-4 * 16 if is_b.pop() else 2e-4)
    assert sum(len(g["params"]) for g in opt.param_groups) == sum(p.requires_grad for p in model.parameters())


def test_settings_peft_cannot_honour_are_refused_by_name(tiny_llama, alpaca_file, tmp_path):
    from pydantic import ValidationError

    def cfg(**lora):
        return tiny_config(tiny_llama, alpaca_file, tmp_path, method={"name": "lora", "lora": lora})

    with pytest.raises(ValidationError, match="init: pissa with use_dora"):
        RunConfig(**cfg(use_dora=True, init="pissa"))
    with pytest.raises(ValidationError, match="lr_ratio"):
        RunConfig(**cfg(lr_ratio=0))
    continued = cfg(use_rslora=True)
    continued["model"]["adapter"] = "continue"
    with pytest.raises(ValidationError, match="method.lora.use_rslora: model.adapter: continue"):
        RunConfig(**continued)
