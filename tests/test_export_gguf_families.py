"""GGUF export per family (Qwen 3, Mistral, Gemma 2, Gemma 3, Phi-3, OLMo 2 beside Llama and Qwen2): llama.cpp
and transformers' GGUF reader compute the source model's logits from the file, and what llama.cpp would
compute differently is refused by name.

The tiny models are made sensitive to what an export gets wrong: q/k projections are scaled so attention
is sharp (a wrong rope permutation or rope scaling moves the logits by ~0.2-0.4, not ~0.005), every norm
weight is random (a swapped post-norm or a missing Gemma 1 + w shows), and windows are shorter than the
texts (27 tokens) so sliding layers differ from full ones."""

from __future__ import annotations

import pytest
import torch

from conftest import build_tokenizer
from strop.core.errors import StropError
from strop.data.template import CHATML, ChatTemplate
from strop.export.gguf_arch import check
from strop.export.gguf_file import write_gguf
from strop.export.gguf_vocab import describe
from test_export_gguf import TEXTS, need_llama_cpp, read_back

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2", "gemma2", "gemma3_text"]
# transformers 5's GGUF reader knows all of these but olmo2; it does not read Gemma's soft-caps, query
# scale or rope bases, nor Qwen3's head_dim, so the tiny configs keep those at transformers' defaults.
TRANSFORMERS_READS = [f for f in FAMILIES if f != "olmo2"]
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}
F16 = 5e-3  # f16 weights; measured worst 1.9e-3 (OLMo 2 in llama.cpp); a wrong transform moves 0.2 or more
SAME_FILE = (
    5e-2  # one quantized file in llama.cpp and transformers (llama.cpp also quantizes activations to q8_0)
)


def tiny(kind: str, **overrides):
    import transformers as T

    tok = build_tokenizer()
    base = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    gemma = dict(num_attention_heads=2, num_key_value_heads=1, head_dim=256, sliding_window=4)
    config_class, extra = {
        "llama": (T.LlamaConfig, {}),
        "mistral": (T.MistralConfig, dict(head_dim=16, sliding_window=None)),
        "qwen2": (T.Qwen2Config, {}),
        "qwen3": (T.Qwen3Config, dict(head_dim=128)),
        "phi3": (T.Phi3Config, {}),
        "olmo2": (T.Olmo2Config, dict(tie_word_embeddings=True)),
        "gemma2": (T.Gemma2Config, gemma),
        "gemma3_text": (T.Gemma3TextConfig, dict(gemma, num_hidden_layers=6)),
    }[kind]
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(config_class(**{**base, **extra, **overrides})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight", "qkv_proj.weight")):
                p.mul_(6)
            elif "norm" in name:
                p.uniform_(-0.5, 0.5) if kind.startswith("gemma") else p.uniform_(0.5, 2.0)
    return model, tok


def export(model, tok, path, quant="f16"):
    write_gguf(
        model,
        describe(tok, model.config.vocab_size, ChatTemplate(tok, CHATML).stop_ids),
        CHATML,
        path,
        quant,
        "tiny",
    )
    return path


def ids_of(tok) -> list[list[int]]:
    return [tok(text, add_special_tokens=False)["input_ids"] for text in TEXTS]


def torch_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def llama_cpp_logits(path, tok) -> list[torch.Tensor]:
    need_llama_cpp()
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=128, logits_all=True, verbose=False)
    try:
        out = []
        for ids in ids_of(tok):  # llama.cpp tokenizes the text as the tokenizer does
            assert llm.tokenize(tok.decode(ids).encode(), add_bos=False, special=True) == ids
            llm.reset()
            llm.eval(ids)
            out.append(torch.tensor(llm.scores[: len(ids)]))
        return out
    finally:
        llm.close()


def worst(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize(
    "kind,overrides",
    [(k, {}) for k in FAMILIES]
    + [
        ("llama", {"rope_parameters": LLAMA3_ROPE}),
        ("llama", {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}}),
        (
            "phi3",
            {
                "rope_parameters": {"rope_theta": 10000.0, "partial_rotary_factor": 0.5},
                "tie_word_embeddings": True,
            },
        ),
        ("qwen3", {"tie_word_embeddings": True}),
        ("gemma2", {"attn_logit_softcapping": 0.5, "final_logit_softcapping": 0.3}),
        (
            "gemma3_text",
            {
                "rope_parameters": {
                    "full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0},
                    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                }
            },
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else "-".join(sorted(v)) or "plain",
)
def test_llama_cpp_computes_each_familys_logits_and_greedy_tokens(kind, overrides, tmp_path):
    model, tok = tiny(kind, **overrides)
    theirs = llama_cpp_logits(export(model, tok, tmp_path / "m.gguf"), tok)
    ours = [torch_logits(model, ids) for ids in ids_of(tok)]
    assert worst(theirs, ours) < F16, worst(theirs, ours)
    for a, b in zip(theirs, ours, strict=True):  # the same greedy next token at every position
        assert torch.equal(a.argmax(-1), b.argmax(-1))


@pytest.mark.parametrize("kind", TRANSFORMERS_READS)
def test_transformers_reads_back_each_family(kind, tmp_path):
    model, tok = tiny(kind)
    back, _ = read_back(export(model, tok, tmp_path / "m.gguf"))
    ids = torch.tensor([tok("What is the capital", add_special_tokens=False)["input_ids"]])
    diff = worst([torch_logits(back, i) for i in ids_of(tok)], [torch_logits(model, i) for i in ids_of(tok)])
    assert diff < F16, diff
    assert torch.equal(
        back.generate(ids, max_new_tokens=8, do_sample=False),
        model.generate(ids, max_new_tokens=8, do_sample=False),
    )


@pytest.mark.parametrize("kind,quant", [("phi3", "q4_0"), ("gemma3_text", "q8_0"), ("mistral", "q4_0")])
def test_quantized_files_compute_the_same_in_llama_cpp_and_transformers(kind, quant, tmp_path):
    """Quantization error is the quant's, not the export's: both readers dequantize the same blocks."""
    model, tok = tiny(kind)
    path = export(model, tok, tmp_path / "m.gguf", quant)
    back, _ = read_back(path)
    diff = worst(llama_cpp_logits(path, tok), [torch_logits(back, i) for i in ids_of(tok)])
    assert diff < SAME_FILE, diff


def test_metadata_carries_soft_caps_windows_and_gemmas_shifted_norms(tmp_path):
    import gguf

    model, tok = tiny("gemma2")
    fields = gguf.GGUFReader(str(export(model, tok, tmp_path / "g.gguf"))).fields
    value = {k: f.contents() for k, f in fields.items() if k.startswith("gemma2.")}
    assert value["gemma2.attention.sliding_window"] == 4
    assert value["gemma2.attn_logit_softcapping"] == 50.0 and value["gemma2.final_logit_softcapping"] == 30.0
    reader = gguf.GGUFReader(str(tmp_path / "g.gguf"))
    norm = next(t for t in reader.tensors if t.name == "blk.0.attn_norm.weight")
    want = model.model.layers[0].input_layernorm.weight.detach().numpy() + 1
    assert abs(norm.data - want).max() < 1e-6
    # llama.cpp's Llama graph has no sliding window: the window becomes the context length
    mistral, _ = tiny("mistral", sliding_window=16)
    fields = gguf.GGUFReader(str(export(mistral, tok, tmp_path / "m.gguf"))).fields
    assert fields["llama.context_length"].contents() == 16


def config(kind: str, **overrides):
    import transformers as T

    classes = {
        "gemma2": T.Gemma2Config,
        "gemma3_text": T.Gemma3TextConfig,
        "llama": T.LlamaConfig,
        "qwen3": T.Qwen3Config,
    }
    return classes[kind](**overrides)


@pytest.mark.parametrize(
    "cfg,message",
    [
        (lambda: config("gemma2", query_pre_attn_scalar=144), "query_pre_attn_scalar=144"),
        (lambda: config("gemma2", final_logit_softcapping=None), "always soft-caps"),
        (lambda: config("gemma2", hidden_activation="gelu"), "uses 'gelu'"),
        (lambda: config("gemma3_text", final_logit_softcapping=30.0), "soft-capping"),
        (lambda: config("gemma3_text", sliding_window_pattern=4), "layer_types differ"),
        (
            lambda: config(
                "gemma3_text",
                rope_parameters={
                    "full_attention": {"rope_type": "default", "rope_theta": 1e6},
                    "sliding_attention": {"rope_type": "default", "rope_theta": 5e4},
                },
            ),
            "sliding layers' rope",
        ),
        (
            lambda: config("llama", rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}),
            "'yarn'",
        ),
        (lambda: config("qwen3", attention_bias=True), "attention_bias"),
    ],
)
def test_what_llama_cpp_would_compute_differently_is_refused_by_name(cfg, message):
    c = cfg()
    with pytest.raises(StropError, match=f"this {c.model_type} model") as err:
        check(c)
    assert message in str(err.value)


def test_gemma3_multimodal_is_refused_by_name():
    from transformers import Gemma3Config

    with pytest.raises(StropError, match="multimodal gemma3 .*mmproj"):
        check(Gemma3Config())


def test_a_sentencepiece_style_tokenizer_llama_cpp_cannot_read_is_refused_by_name():
    """Gemma, Phi-3 and Mistral v0.1-v0.3 ship byte-fallback BPE tokenizers that llama.cpp reads as its
    scored 'llama' vocabulary (tests/test_gguf_vocab_spm.py); one without all 256 byte tokens is refused
    instead of written as GPT-2 BPE."""
    from tokenizers import Tokenizer, models, normalizers
    from transformers import PreTrainedTokenizerFast

    bpe = models.BPE(
        vocab={"<unk>": 0, "a": 1, "<0x41>": 2}, merges=[], byte_fallback=True, unk_token="<unk>"
    )
    backend = Tokenizer(bpe)
    backend.normalizer = normalizers.Replace(" ", "\u2581")
    with pytest.raises(StropError, match="SentencePiece-style"):
        describe(PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>"), 3, set())
