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
from strop.export import gguf_arch
from strop.export.gguf_vocab import Vocab

QUANTS = ("f16", "q8_0", "q4_0")


def check_architecture(config) -> str:
    """The model type of a transformers config GGUF export can write, or a refusal naming it."""
    gguf_arch.check(config)
    return config.model_type


def _vocab(writer, vocab: Vocab, chat_template: str) -> None:
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
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

    cfg = model.config
    family = gguf_arch.check(cfg)
    arch = getattr(gguf.MODEL_ARCH, family.arch)
    names = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    tmp = path.with_name(path.name + ".partial")
    writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(name)
    gguf_arch.write_metadata(writer, cfg, family)
    writer.add_file_type(
        {
            "f16": gguf.LlamaFileType.MOSTLY_F16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
            "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
        }[quant]
    )
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _vocab(writer, vocab, chat_template)
    types: dict[str, str] = {}
    freqs = gguf_arch.rope_freqs(cfg)
    if freqs is not None:
        writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", freqs)
        types["rope_freqs.weight"] = "f32"
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings and not family.output_always:
            continue  # llama.cpp reads the output projection from token_embd when output is absent
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise StropError(f"export: no GGUF name for tensor {hf_name} of a {cfg.model_type} model")
        w = gguf_arch.transform(hf_name, tensor.detach().to(torch.float32).cpu().numpy(), cfg, family)
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
