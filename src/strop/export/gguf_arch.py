"""What each model family needs to become a GGUF file llama.cpp computes the same logits from: the GGUF
architecture, the metadata llama.cpp reads for it, the tensor transforms llama.cpp's
convert_hf_to_gguf.py applies, and a refusal by name for anything llama.cpp would compute differently.

Per family (llama.cpp's `llama-model.cpp` is what fixes these):

- llama, mistral -> LLAMA: q/k rows permuted (llama.cpp rotates interleaved pairs, transformers halves).
- qwen2, qwen3, olmo2, phi3: rotate halves like transformers, tensors as they are; Qwen3 and OLMo 2's
  q/k norms and OLMo 2's post-norms map by name; Phi-3's fused qkv and gate_up stay fused.
- gemma2, gemma3_text: RMSNorm weights stored as (1 + w) (Gemma scales by 1 + w, llama.cpp by w);
  llama.cpp scales the embeddings by sqrt(hidden) itself. It hard-codes which layers slide (Gemma 2:
  every other one; Gemma 3: five of six), the query scale (1/sqrt(head_dim), 1/sqrt(hidden/heads) at
  the 27B sizes), Gemma 3's local rope base (10000) and always soft-caps Gemma 2, so a config that
  differs is refused rather than written wrong.
- A sliding window llama.cpp does not apply (llama, mistral, qwen2, qwen3, phi3) is honoured by writing
  the window as the context length: up to it, windowed attention is full attention.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from strop.core.errors import StropError

log = logging.getLogger("strop.export")


@dataclass(frozen=True)
class Family:
    arch: str  # gguf.MODEL_ARCH member
    rotate_pairs: bool = False  # llama.cpp's "norm" rope: permute q/k rows (convert_hf_to_gguf.py)
    norm_shift: float = 0.0  # added to every *norm.weight (Gemma's 1 + w)
    activation: str = "silu"
    swa_every: int = 0  # llama.cpp applies the window to layer i when i % swa_every < swa_every - 1
    big_layers: int = 0  # the layer count of the size whose query scale is 1/sqrt(hidden/heads)
    output_always: bool = False  # llama.cpp needs output.weight even when tied to the embedding


FAMILIES = {
    "llama": Family("LLAMA", rotate_pairs=True),
    "mistral": Family("LLAMA", rotate_pairs=True),
    "qwen2": Family("QWEN2"),
    "qwen3": Family("QWEN3"),
    "phi3": Family("PHI3"),
    "olmo2": Family("OLMO2", output_always=True),
    "gemma2": Family("GEMMA2", norm_shift=1.0, activation="gelu_pytorch_tanh", swa_every=2, big_layers=46),
    "gemma3_text": Family(
        "GEMMA3", norm_shift=1.0, activation="gelu_pytorch_tanh", swa_every=6, big_layers=62
    ),
}
ROPE_TYPES = ("default", "linear", "llama3")


def _refuse(kind: str, what: str) -> StropError:
    return StropError(f"export: cannot write this {kind} model as GGUF: {what}")


def rope(config) -> tuple[dict, dict | None]:
    """(the full-attention layers' rope parameters, the sliding layers' or None)."""
    p = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if "full_attention" in p:  # Gemma 3: one entry per layer type
        return p["full_attention"], p.get("sliding_attention")
    if "rope_theta" not in p and getattr(config, "rope_theta", None) is not None:
        p = {**p, "rope_theta": config.rope_theta}
    return p, None


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def window(config) -> int | None:
    """The sliding window some layers use, or None when every layer attends to all before it."""
    w = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if w is None or (types is not None and "sliding_attention" not in types):
        return None
    return int(w)


def check(config) -> Family:
    """The family of a transformers config, or a refusal naming the model type and what is missing."""
    kind = getattr(config, "model_type", None)
    if kind == "gemma3":
        raise StropError(
            "export: GGUF export takes Gemma 3's text model (model_type gemma3_text); this is the multimodal "
            "gemma3 (Gemma3ForConditionalGeneration), whose vision tower llama.cpp reads from a separate "
            "mmproj file strop does not write (use --format hf)"
        )
    if kind not in FAMILIES:
        raise StropError(
            f"export: GGUF export supports {', '.join(sorted(FAMILIES))} models; this one is {kind!r} "
            "(use --format hf for a transformers folder)"
        )
    family = FAMILIES[kind]
    full, local = rope(config)
    kind_of_rope = full.get("rope_type", full.get("type", "default")) or "default"
    if kind_of_rope not in ROPE_TYPES:
        raise _refuse(kind, f"rope scaling {kind_of_rope!r} is not written (only {', '.join(ROPE_TYPES)})")
    if kind_of_rope == "llama3" and not family.rotate_pairs:
        raise _refuse(kind, "llama3 rope scaling is written for Llama-architecture files only")
    if float(full.get("partial_rotary_factor", 1.0)) != 1.0 and kind != "phi3":
        raise _refuse(kind, "a partial rotary factor is not written for this family")
    act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
    if act != family.activation:
        raise _refuse(kind, f"llama.cpp computes its MLP with {family.activation}; this one uses {act!r}")
    if getattr(config, "attention_bias", False) and kind != "qwen2":
        raise _refuse(kind, "attention_bias=True (llama.cpp's graph for it has no q/k/v biases checked here)")
    if getattr(config, "mlp_bias", False):
        raise _refuse(kind, "mlp_bias=True")
    if getattr(config, "use_bidirectional_attention", False):
        raise _refuse(kind, "bidirectional attention (an encoder) is not a llama.cpp causal LM")
    if family.swa_every:
        _check_gemma(config, kind, family, local)
    return family


def _check_gemma(config, kind: str, family: Family, local: dict | None) -> None:
    types = getattr(config, "layer_types", None) or []
    n = family.swa_every
    if window(config) is not None:
        expected = ["sliding_attention" if i % n < n - 1 else "full_attention" for i in range(len(types))]
        if types != expected:
            raise _refuse(
                kind, f"llama.cpp slides the window on {n - 1} layers of every {n}; layer_types differ"
            )
    scale = config.query_pre_attn_scalar
    want = (
        config.hidden_size // config.num_attention_heads
        if config.num_hidden_layers == family.big_layers
        else head_dim(config)
    )
    if scale != want:
        raise _refuse(
            kind, f"query_pre_attn_scalar={scale}; llama.cpp scales queries by 1/sqrt({want}) at this size"
        )
    if kind == "gemma2":
        if config.attn_logit_softcapping is None or config.final_logit_softcapping is None:
            raise _refuse(kind, "llama.cpp always soft-caps Gemma 2's logits; this config has no cap")
        return
    if local is not None and (
        float(local.get("rope_theta", 0)) != 10000.0 or local.get("rope_type", "default") != "default"
    ):
        raise _refuse(
            kind, f"llama.cpp fixes the sliding layers' rope to base 10000, unscaled; this one is {local}"
        )
    if config.attn_logit_softcapping is not None or config.final_logit_softcapping is not None:
        raise _refuse(kind, "soft-capping is not applied by llama.cpp's Gemma 3")


def write_metadata(writer, config, family: Family) -> None:
    """The hyperparameters llama.cpp reads for `family` (gguf.GGUFWriter's add_* keys)."""
    import gguf

    kind = config.model_type
    heads = config.num_attention_heads
    dim = head_dim(config)
    full, _ = rope(config)
    context = config.max_position_embeddings
    w = window(config)
    if w is not None and not family.swa_every and w < context:
        log.warning(
            "export: llama.cpp runs %s without a sliding window; the file's context length is the window (%d)",
            kind,
            w,
        )
        context = w
    writer.add_context_length(context)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_rope_freq_base(float(full.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(int(dim * float(full.get("partial_rotary_factor", 1.0))))
    if dim * heads != config.hidden_size or family.swa_every:
        writer.add_key_length(dim)
        writer.add_value_length(dim)
    if full.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(full["factor"]))
    if family.swa_every and w is not None:
        writer.add_sliding_window(w)
    elif kind == "phi3" and w is not None:
        writer.add_sliding_window(w)  # as convert_hf_to_gguf.py writes it; today's llama.cpp ignores it
    if kind == "gemma2":
        writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping))
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))


def rope_freqs(config) -> np.ndarray | None:
    """Llama 3.1's rope scaling as llama.cpp reads it: a per-frequency divisor tensor `rope_freqs.weight`
    (convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors)."""
    full, _ = rope(config)
    if full.get("rope_type") != "llama3":
        return None
    dim = head_dim(config)
    base = float(full.get("rope_theta", 10000.0))
    factor, low, high = full["factor"], full.get("low_freq_factor", 1.0), full.get("high_freq_factor", 4.0)
    old = full.get("original_max_position_embeddings", 8192)
    out = []
    for freq in 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim):
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def transform(hf_name: str, w: np.ndarray, config, family: Family) -> np.ndarray:
    """One tensor as llama.cpp wants it for `family`."""
    if family.rotate_pairs and hf_name.endswith(
        ("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias")
    ):
        heads = config.num_attention_heads
        n = heads if "q_proj" in hf_name else (getattr(config, "num_key_value_heads", None) or heads)
        w = w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    if family.norm_shift and hf_name.endswith("norm.weight"):
        w = w + family.norm_shift
    return w
