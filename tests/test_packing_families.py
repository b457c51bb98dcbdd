"""Packed == padded for every causal family strop packs (issue 32): the per-example losses and the
gradients of one packed forward/backward equal those of the padded batch under the family's own eager
attention, with sliding windows (Mistral, Qwen2, Gemma 2/3, gpt-oss), Gemma 2's soft-capped logits,
Gemma's query_pre_attn_scalar and gpt-oss's sinks honoured; what segment attention cannot honour is
refused by name before training."""

from __future__ import annotations

import sys
import types

import pytest
import torch
import transformers as tf

from strop.core.errors import ConfigError
from strop.data.batches import collate
from strop.data.packing import pack
from strop.models import attention
from strop.models.attention import NAME, enable_segment_attention
from test_packing import LENGTHS, PAD, packed_example_losses, synthetic_set, token_losses

WINDOW = 4  # shorter than most examples (LENGTHS run to 20 tokens), so the window binds
SLIDING, FULL = "sliding_attention", "full_attention"
COMMON = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    initializer_range=0.2,  # peaked attention, so a window or a cap changes the losses visibly
)
FAMILIES = {
    "llama": (tf.LlamaConfig, {}),
    "qwen2": (tf.Qwen2Config, dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)),
    "qwen3": (tf.Qwen3Config, dict(head_dim=8)),
    "mistral": (tf.MistralConfig, dict(sliding_window=WINDOW)),
    "gemma2": (
        tf.Gemma2Config,
        dict(head_dim=8, sliding_window=WINDOW, attn_logit_softcapping=2.0, layer_types=[SLIDING, FULL]),
    ),
    "gemma3_text": (
        tf.Gemma3TextConfig,
        dict(head_dim=8, sliding_window=WINDOW, layer_types=[SLIDING, FULL]),
    ),
    "phi3": (tf.Phi3Config, {}),
    "olmo2": (tf.Olmo2Config, {}),
    "gpt_oss": (
        tf.GptOssConfig,
        dict(
            head_dim=8,
            sliding_window=WINDOW,
            layer_types=[SLIDING, FULL],
            num_local_experts=4,
            num_experts_per_tok=2,
        ),
    ),
}


def build(family: str, impl: str = "eager", **extra) -> torch.nn.Module:
    """A tiny random model of `family`, the same weights for every call (seeded)."""
    config_cls, kwargs = FAMILIES[family]
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(
        config_cls(**{**COMMON, **kwargs, **extra}), dtype=torch.float32, attn_implementation=impl
    )
    return model.eval()


def padded_example_losses(model, ts) -> tuple[list[torch.Tensor], torch.Tensor]:
    """All examples in one right-padded batch with its attention mask: per-example summed losses."""
    batch = collate(ts, list(range(len(ts))), PAD)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ce = token_losses(logits, batch["labels"])  # (B, T-1)
    return list(ce.sum(1)), ce.sum()


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_losses_and_gradients_equal_padded(family):
    ref, packed = build(family), build(family)
    assert enable_segment_attention(packed) == NAME
    ts = synthetic_set(LENGTHS, packed.config.vocab_size)
    rows = pack([len(x) for x in ts.ids], 32)
    assert len(rows) < len(LENGTHS) and max(len(r) for r in rows) > 1  # rows really are shared

    per_example, total, _ = packed_example_losses(packed, ts, rows)
    want, want_total = padded_example_losses(ref, ts)
    total.backward()
    want_total.backward()
    for i in range(len(ts)):
        torch.testing.assert_close(per_example[i], want[i].detach(), atol=1e-5, rtol=0, msg=f"example {i}")
    grads = dict(ref.named_parameters())
    for name, p in packed.named_parameters():
        want_grad = grads[name].grad  # fp32 sums over ~200 tokens: error relative to the tensor's scale
        scale = max(1.0, float(want_grad.abs().max()))
        torch.testing.assert_close(p.grad, want_grad, atol=1e-5 * scale, rtol=1e-5, msg=name)


@pytest.mark.parametrize("family", ["mistral", "gemma2", "gemma3_text", "gpt_oss"])
def test_a_model_left_on_segment_attention_keeps_the_variants_unpacked(family):
    """Validation batches (padded, with a mask) and a lone unpadded row (no mask: the window is the
    attention's job there) give eager's logits, and greedy generation (a cache) gives eager's tokens."""
    ref, model = build(family), build(family)
    enable_segment_attention(model)
    ts = synthetic_set(LENGTHS, model.config.vocab_size)
    batch = collate(ts, list(range(len(ts))), PAD)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        real = mask.bool()
        torch.testing.assert_close(
            model(input_ids=ids, attention_mask=mask).logits[real],
            ref(input_ids=ids, attention_mask=mask).logits[real],
            atol=1e-5,
            rtol=0,
        )
        longest = ids[3:4]  # 20 tokens, no padding
        torch.testing.assert_close(
            model(input_ids=longest).logits, ref(input_ids=longest).logits, atol=1e-5, rtol=0
        )
        prompt = ids[3:4, :10]
        args = dict(max_new_tokens=8, do_sample=False, pad_token_id=PAD)
        assert torch.equal(model.generate(prompt, **args), ref.generate(prompt, **args))


def test_non_causal_layers_are_refused_by_name():
    """EmbeddingGemma-style bidirectional Gemma 3: packing it as causal segments would train another model."""
    model = build("gemma3_text", use_bidirectional_attention=True)
    with pytest.raises(ConfigError, match=r"^train\.batch_tokens: .*gemma3_text.*non-causal"):
        enable_segment_attention(model)


def test_an_attention_argument_it_does_not_know_is_refused_by_name():
    """A layer passing something segment attention would ignore (here an ALiBi-style bias) is refused
    by the probe forward in `enable_segment_attention`, before any training step."""
    model = build("llama")
    for layer in model.model.layers:
        forward = layer.self_attn.forward
        layer.self_attn.forward = lambda *a, _f=forward, **k: _f(*a, position_bias=torch.zeros(1), **k)
    with pytest.raises(ConfigError, match=r"^train\.batch_tokens: .*llama.*\(position_bias\)"):
        enable_segment_attention(model)


def test_an_sft_run_refuses_packing_before_training(tmp_path):
    from conftest import ALPACA_ROWS, build_tokenizer, tiny_config, write_jsonl
    from strop.recipes.sft import train

    tok = build_tokenizer()
    model = build("gemma3_text", use_bidirectional_attention=True, vocab_size=len(tok))
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    data = write_jsonl(tmp_path / "d.jsonl", ALPACA_ROWS)
    cfg = tiny_config(tmp_path / "m", data, tmp_path / "out", train={"batch_tokens": 512, "max_steps": 1})
    with pytest.raises(ConfigError, match=r"train\.batch_tokens: .*gemma3_text"):
        train(cfg, show_progress=False)
    assert not list(tmp_path.glob("out/**/metrics.jsonl"))


def test_flash_is_chosen_only_when_its_kernel_takes_every_variant(monkeypatch):
    """transformers' flash path drops a sink (and a window) the installed kernel cannot take."""

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, window_size=(-1, -1), softcap=0.0):
        raise AssertionError("not called")

    monkeypatch.setitem(
        sys.modules, "fake_flash", types.SimpleNamespace(flash_attn_varlen_func=flash_attn_varlen_func)
    )
    assert attention._flash_takes("fake_flash", {"sliding_window", "softcap"})
    assert not attention._flash_takes("fake_flash", {"sliding_window", "s_aux"})


@pytest.mark.parametrize("family", ["mistral", "gemma3_text"])
def test_an_sft_step_on_packed_rows_matches_padded_batches(family, tmp_path):
    """The issue's reproduction through the recipe: all 16 training rows in one step, packed
    (`train.batch_tokens`) and padded (`train.batch_size`), give the same step-1 loss."""
    import json

    from conftest import ALPACA_ROWS, build_tokenizer, tiny_config, write_jsonl
    from strop.recipes.sft import train

    tok = build_tokenizer()
    build(family, vocab_size=len(tok)).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    data = write_jsonl(tmp_path / "d.jsonl", ALPACA_ROWS)
    first = []
    for out, batch in (("a", {"batch_size": 16}), ("b", {"batch_tokens": 2048})):
        cfg = tiny_config(tmp_path / "m", data, tmp_path / out, train={**batch, "max_steps": 1})
        run = train(cfg, show_progress=False)
        first.append(json.loads((run.run_dir / "metrics.jsonl").read_text().splitlines()[0]))
    assert first[0]["label_tokens"] == first[1]["label_tokens"]
    assert first[1]["loss"] == pytest.approx(first[0]["loss"], abs=1e-5)
