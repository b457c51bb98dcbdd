"""Write a merged causal LM as a GGUF file for llama.cpp and Ollama, with `gguf`'s writer and numpy
quantizers: architecture metadata, the tokenizer (gguf_vocab.py), the chat template the run trained
with, and the tensors in f16, q8_0 or q4_0.

Which tensor becomes what is returned, so the caller can report it: 1-D tensors (norms, biases) stay
f32; a matrix whose rows do not split into the quant type's blocks stays f16 (llama.cpp's quantizer
does the same kind of fallback, e.g. for K-quants on rows not divisible by 256); in q4_0 the token
embedding is q8_0, as llama.cpp's own q4_0 files keep the embedding and output at higher precision.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from strop.core.errors import StropError
from strop.export.gguf_vocab import Vocab

QUANTS = ("f16", "q8_0", "q4_0")
ARCHS = {"llama": "LLAMA", "qwen2": "QWEN2"}  # model_type -> gguf.MODEL_ARCH name


def check_architecture(config) -> str:
    """The GGUF architecture of a transformers config, or a refusal naming it."""
    kind = getattr(config, "model_type", None)
    if kind not in ARCHS:
        raise StropError(
            f"export: GGUF export supports {', '.join(sorted(ARCHS))} models; this one is {kind!r} "
            "(use --format hf for a transformers folder)"
        )
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise StropError(f"export: rope scaling {rope.get('rope_type')!r} is not written to GGUF yet")
    return kind


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's Llama rotates interleaved pairs; transformers rotates halves (convert_hf_to_gguf.py)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _metadata(writer, config, kind: str) -> None:
    heads, kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    if head_dim * heads != config.hidden_size:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def _vocab(writer, vocab: Vocab, chat_template: str) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    add = {
        "bos": writer.add_bos_token_id,
        "eos": writer.add_eos_token_id,
        "unk": writer.add_unk_token_id,
        "pad": writer.add_pad_token_id,
        "eot": writer.add_eot_token_id,
    }
    for key, token_id in vocab.special.items():
        add[key](token_id)
    writer.add_add_bos_token(False)  # strop tokenizes with add_special_tokens=False: the template says it all
    writer.add_add_eos_token(False)
    writer.add_chat_template(chat_template)


def _encode(name: str, w: np.ndarray, quant: str):
    """(data, gguf type) for one tensor under the requested quant."""
    import gguf

    Q = gguf.GGMLQuantizationType
    if w.ndim == 1:
        return w.astype(np.float32), Q.F32
    want = {"f16": Q.F16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[quant]
    if quant == "q4_0" and name == "token_embd.weight":
        want = Q.Q8_0
    if want != Q.F16 and w.shape[-1] % gguf.GGML_QUANT_SIZES[want][0]:
        want = Q.F16
    return gguf.quants.quantize(w.astype(np.float32), want), want


def write_gguf(model, vocab: Vocab, chat_template: str, path: Path, quant: str, name: str) -> dict[str, str]:
    """Write `model` (a merged transformers causal LM) to `path` (atomically); returns tensor -> type."""
    import gguf

    kind = check_architecture(model.config)
    arch = getattr(gguf.MODEL_ARCH, ARCHS[kind])
    cfg = model.config
    names = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    tmp = path.with_name(path.name + ".partial")
    writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(name)
    _metadata(writer, cfg, kind)
    writer.add_file_type(
        {
            "f16": gguf.LlamaFileType.MOSTLY_F16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
            "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
        }[quant]
    )
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _vocab(writer, vocab, chat_template)
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
    types: dict[str, str] = {}
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # llama.cpp reads the output projection from token_embd when output is absent
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise StropError(f"export: no GGUF name for tensor {hf_name} of a {kind} model")
        w = tensor.detach().to(torch.float32).cpu().numpy()
        if kind == "llama" and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            w = _permute(w, heads if "q_proj" in hf_name else kv)
        data, qtype = _encode(gguf_name, w, quant)
        writer.add_tensor(gguf_name, data, raw_dtype=qtype)
        types[gguf_name] = qtype.name.lower()
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return types


def summarize(types: dict[str, str]) -> str:
    """'f16: 2, q8_0: 210, f32: 61' in the order of most tensors first."""
    return ", ".join(f"{t}: {n}" for t, n in Counter(types.values()).most_common())
