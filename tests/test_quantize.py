"""`--quantize int8`: int8 linear layers on CPU for chat, generate, eval and serve."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_cli, write_jsonl
from strop.core.errors import ConfigError
from strop.models.engine import BASE, Engine, Request
from strop.models.inference import load_for_inference
from strop.models.quantize import SKIP, quantize_model
from test_models import _convs, _lively_dir, train_run

TEXTS = ["the sea and the ships", "hello there, how are you"]


@pytest.fixture(scope="module")
def lively(tmp_path_factory):
    return _lively_dir(tmp_path_factory.mktemp("quant"), "llama")


def _logits(model, tok, texts=TEXTS):
    with torch.inference_mode():
        return [model(**tok(t, return_tensors="pt")).logits[0] for t in texts]


def _close(a, b):
    """int8 weights and activations move the logits by a few percent of their spread, not more."""
    for x, y in zip(a, b, strict=True):
        spread, err = y.max() - y.min(), (x - y).abs()
        assert err.mean() <= 0.02 * spread and err.max() <= 0.1 * spread, (err.mean(), err.max(), spread)


def test_int8_replaces_the_linear_layers_but_the_skipped_ones_and_keeps_the_logits_close(lively):
    fp32 = load_for_inference(str(lively), device="cpu")
    want = _logits(fp32.model, fp32.tokenizer)
    q = load_for_inference(str(lively), device="cpu", quantize="int8")
    int8 = {
        n
        for n, m in q.model.named_modules()
        if type(m).__name__ == "Linear" and "quantized" in type(m).__module__
    }
    fp = {n for n, m in q.model.named_modules() if type(m) is torch.nn.Linear}
    assert int8 and all(
        n.split(".")[-1] in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj") for n in int8
    )
    assert fp and all(n.split(".")[-1] in SKIP for n in fp), fp
    got = _logits(q.model, q.tokenizer)
    _close(got, want)
    assert any((g - w).abs().max() > 0 for g, w in zip(got, want, strict=True)), "nothing was quantized"


def test_a_lora_run_is_merged_then_quantized(lively, alpaca_file, tmp_path):
    run = train_run(lively, alpaca_file, tmp_path / "runs", train={"max_steps": 6}).run_dir
    merged = load_for_inference(str(run), device="cpu")
    q = load_for_inference(str(run), device="cpu", quantize="int8")
    assert not hasattr(q.model, "peft_config")
    _close(_logits(q.model, q.tokenizer), _logits(merged.model, merged.tokenizer))


def test_several_adapters_keep_fp32_lora_over_an_int8_base(lively):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(lively)
    stops = {tok.eos_token_id}
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(lively),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
        "a",
    )
    model.add_adapter("b", LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.eval()
    prompts = [tok(t)["input_ids"] for t in TEXTS]
    want = {}
    for name in ("a", "b"):
        model.set_adapter(name)
        want[name] = _logits(model, tok)
    q = quantize_model(model, "int8", merge=False)
    assert all(
        type(m) is torch.nn.Linear for n, m in q.named_modules() if n.endswith(("lora_A.a", "lora_B.b"))
    )
    for name in ("a", "b"):
        q.set_adapter(name)
        _close(_logits(q, tok), want[name])
    # one batch, a row per adapter (peft's adapter_names over the int8 base), each close to that adapter alone;
    # not equal: activations are quantized with one scale per batch, so a row's neighbours move it slightly
    batch = tok(TEXTS[:1] * 3, return_tensors="pt")
    with torch.inference_mode():
        mixed = q(**batch, adapter_names=["a", "b", BASE]).logits
        with q.disable_adapter():
            base = q(**tok(TEXTS[:1], return_tensors="pt")).logits[0]
    _close([mixed[0], mixed[1], mixed[2]], [want["a"][0], want["b"][0], base])
    assert (mixed[0] - mixed[1]).abs().max() > 0.1, "the adapters should differ"
    q.set_adapter("a")
    reqs = [Request(p, max_new_tokens=4, adapter=n) for p, n in zip(prompts, ["b", BASE], strict=True)]
    Engine(q, tok, stops).run(reqs)
    assert all(len(r.tokens) >= 1 and r.error is None for r in reqs)


def test_what_int8_cannot_do_is_refused_by_name(lively):
    m = load_for_inference(str(lively), device="cpu").model
    with pytest.raises(ConfigError, match="--quantize int4"):
        quantize_model(m, "int4")
    with pytest.raises(ConfigError, match="fp32"):
        quantize_model(m.to(torch.bfloat16), "int8")


def test_generate_and_eval_take_quantize_int8(lively, tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    rc, _, err = run_cli(
        [
            "generate",
            str(lively),
            "--prompt",
            "hello",
            "--quantize",
            "int8",
            "--out",
            str(out),
            "--max-new-tokens",
            "5",
        ],
        capsys,
    )
    assert rc == 0, err
    assert json.loads(out.read_text())["response"]
    data = write_jsonl(
        tmp_path / "e.jsonl", [{"prompt": f"say {i}", "completion": f"ok {i}"} for i in range(3)]
    )
    rc, outtext, err = run_cli(
        [
            "eval",
            str(lively),
            "--data",
            str(data),
            "--quantize",
            "int8",
            "--max-new-tokens",
            "4",
            "--out",
            str(tmp_path / "ev"),
        ],
        capsys,
    )
    assert rc == 0, err
    assert "3 examples" in outtext
    rc, _, err = run_cli(["generate", str(lively), "--prompt", "hi", "--quantize", "int4"], capsys)
    assert rc == 2 and "--quantize" in err


def test_serve_with_int8_answers_as_the_quantized_model(lively):
    from strop.models.generate import generate
    from test_serve import running

    q = load_for_inference(str(lively), device="cpu", quantize="int8")
    want = generate(q.model, q.template, _convs(["hello there"]), max_new_tokens=8)[0]
    with running(lively, quantize="int8") as s:
        got = s.client.chat.completions.create(
            model=lively.name, messages=_convs(["hello there"])[0], max_tokens=8, temperature=0
        )
    assert got.choices[0].message.content.strip() == want
