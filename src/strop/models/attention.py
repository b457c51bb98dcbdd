"""Attention confined to each packed example, registered at transformers' attention extension point.

`segment_attention` runs causal SDPA separately on every segment of a packed row, so no token attends
across examples and no dense (T x T) block-diagonal mask is ever built: a row of 1024 tokens holding
eight examples costs eight small causal attentions instead of one masked 1024 x 1024 one. It works
on any device and dtype (CPU included). Where flash-attention is installed (CUDA, fp16/bf16),
`enable_segment_attention` picks transformers' own "flash_attention_2"/"_3" instead: it reads the
same `cu_seq_lens_q/k` and `max_length_q/k` keys of a packed batch (`strop.data.packing`).

Packed must train the model padded trains, for every family: within a segment each layer gets the
attention its family's eager code computes (sliding windows for Mistral, Qwen2, Gemma 2/3, gpt-oss;
Gemma 2's soft-capped logits; gpt-oss's sinks; Gemma's query_pre_attn_scalar). A layer that passes
anything else is refused by name before training, never run as plain causal attention.

How a packed batch reaches the attention (transformers 5.x, Llama and GPT-2 alike): `model(**kwargs)`
forwards unknown keyword arguments through the decoder layers into the attention interface, and the
models hand `position_ids` down the same way. `position_ids` restart at 0 per example, which is what
both rotary (Llama) and learned absolute (GPT-2) position embeddings need to match unpacked.

The mask function registered beside it builds no mask when there is nothing to mask beyond
causality (no 2-D attention_mask, no cache), and otherwise defers to the SDPA mask, so a model left on
"strop_segments" still runs ordinary padded batches and generation exactly as with "sdpa".
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import itertools

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from strop.core.errors import ConfigError

NAME = "strop_segments"


# what the attention interface passes beside the tensors that does not change what attention computes
_INERT = frozenset(
    {
        "cu_seq_lens_k",  # checked equal to cu_seq_lens_q
        "max_length_q",
        "max_length_k",
        "use_cache",
        "output_attentions",  # no weights are returned, as with "sdpa"
        "output_hidden_states",
        "output_router_logits",
        "return_dict",
        "num_items_in_batch",
    }
)
_probe_seen: set[str] | None = None  # the variants a probe forward met (`_probe`), else None


def segment_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # (B, H, T, D)
    key: torch.Tensor,  # (B, H_kv, S, D)
    value: torch.Tensor,  # (B, H_kv, S, D)
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    s_aux: torch.Tensor | None = None,
    is_causal: bool | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Causal attention within each segment of each row; returns (B, T, H, D) like the SDPA interface.

    Segments come from `cu_seq_lens_q` (boundaries over the flattened B * T tokens), else from
    `position_ids` restarting at 0 (transformers' packed-sequence convention), else each row is one.
    Every variant a family passes is honoured inside each segment, as its eager attention computes it:
    `scaling` (Gemma's query_pre_attn_scalar), `sliding_window` W (a query sees itself and the W - 1
    tokens before it, transformers' `sliding_window_overlay` for every family, and flash-attention's
    `window_size=(W - 1, W - 1)`), `softcap` (Gemma 2: logits -> softcap * tanh(logits / softcap)) and
    `s_aux` (gpt-oss: one learned sink logit per head joins the softmax and is dropped). SDPA cannot
    soft-cap nor sink, so those layers compute their scores explicitly. Anything else that would change
    the result (a non-causal layer, an unknown argument) is refused with a ConfigError naming
    `train.batch_tokens` and the model type; `enable_segment_attention` meets it before training.

    With a real mask or a cache (padded batches, generation) the mask already holds causality and the
    window (the SDPA mask is built from the family's mask function), so this is "sdpa", or the same
    mask applied to explicit scores when there is a softcap or a sink.
    """
    variants = {
        name
        for name, value_ in (("sliding_window", sliding_window), ("softcap", softcap), ("s_aux", s_aux))
        if value_ is not None
    }
    _refuse_what_changes_the_math(module, is_causal, kwargs)
    if _probe_seen is not None:
        _probe_seen.update(variants)
    b, h, t, d = query.shape
    groups = getattr(module, "num_key_value_groups", 1)
    scale = d**-0.5 if scaling is None else scaling
    sinks = None if s_aux is None else s_aux.view(1, -1, 1, 1)  # (1, H, 1, 1)
    if attention_mask is not None or key.shape[2] != t:
        if softcap is None and sinks is None:
            return sdpa_attention_forward(
                module,
                query,
                key,
                value,
                attention_mask,
                dropout=dropout,
                scaling=scaling,
                is_causal=is_causal,
                **kwargs,
            )
        out = _explicit(query, key, value, attention_mask, scale, softcap, sinks, dropout, groups)
        return out.transpose(1, 2), None

    if cu_seq_lens_q is None and position_ids is not None and position_ids.ndim == 2 and t > 1:
        cu_seq_lens_q = _boundaries(position_ids.expand(b, -1))
    cu_k = kwargs.get("cu_seq_lens_k")
    if cu_seq_lens_q is not None and cu_k is not None and cu_k is not cu_seq_lens_q:
        if not torch.equal(cu_k.to(cu_seq_lens_q.device), cu_seq_lens_q):
            raise ValueError("cu_seq_lens_k must equal cu_seq_lens_q: a packed row attends within itself")
    bounds = list(range(0, b * t + 1, t)) if cu_seq_lens_q is None else cu_seq_lens_q.tolist()
    # one host sync per layer above; a row of 1024 tokens has ~10 boundaries
    if bounds[0] != 0 or bounds[-1] != b * t:
        raise ValueError(f"cu_seq_lens_q must run from 0 to {b * t} (all {b} x {t} tokens), got {bounds}")

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return _causal(q, k, v, scale, sliding_window, softcap, sinks, dropout, groups)

    if len(bounds) - 1 == b:  # one segment per row: an ordinary causal batch
        return attend(query, key, value).transpose(1, 2), None
    if not set(range(0, b * t, t)) <= set(bounds):
        raise ValueError(f"a segment crosses a row boundary (rows of {t} tokens): {bounds}")
    lens = [end - start for start, end in itertools.pairwise(bounds)]

    def segments(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # (B, H, T, D) -> (B*T, H, D), a view for the (B, T, H, D) memory projections produce; split's
        # backward is then a single cat, and segments follow cu_seq_lens' flattened order
        return x.transpose(1, 2).reshape(b * t, x.shape[1], x.shape[3]).split(lens)

    outs = [
        attend(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None])[0].transpose(0, 1)
        for q, k, v in zip(segments(query), segments(key), segments(value), strict=True)
    ]  # each (n, H, D)
    return torch.cat(outs).view(b, t, h, -1), None  # (B, T, H, D)


def _refuse_what_changes_the_math(module: torch.nn.Module, is_causal: bool | None, kwargs: dict) -> None:
    unknown = sorted(k for k, v in kwargs.items() if k not in _INERT and v is not None)
    bidirectional = is_causal is False or (is_causal is None and getattr(module, "is_causal", True) is False)
    if not unknown and not bidirectional:
        return
    config = getattr(module, "config", None)
    model_type = getattr(config, "model_type", None) or type(module).__name__
    what = (
        "non-causal attention"
        if bidirectional
        else f"an attention argument strop does not know ({', '.join(unknown)})"
    )
    raise ConfigError(
        f"train.batch_tokens: packed rows cannot honour {model_type}'s attention: its layers pass "
        f"{what}, which segment attention would ignore; train {model_type} with train.batch_size instead"
    )


def _causal(
    q: torch.Tensor,  # (N, H, n, D)
    k: torch.Tensor,  # (N, H_kv, n, D)
    v: torch.Tensor,
    scale: float,
    window: int | None,
    softcap: float | None,
    sinks: torch.Tensor | None,
    dropout: float,
    groups: int,
) -> torch.Tensor:
    """Causal attention over N sequences of n tokens, a query seeing at most `window` tokens (itself
    included); (N, H, n, D)."""
    n = q.shape[2]
    band = None
    if window is not None and n > window:  # a window as long as the segment changes nothing
        i = torch.arange(n, device=q.device)
        band = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)  # (n, n), True = attend
    if softcap is None and sinks is None:
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=band,
            dropout_p=dropout,
            scale=scale,
            is_causal=band is None,
            enable_gqa=groups > 1,
        )
    if band is None:
        band = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    return _explicit(q, k, v, band, scale, softcap, sinks, dropout, groups)


def _explicit(
    q: torch.Tensor,  # (N, H, n, D)
    k: torch.Tensor,  # (N, H_kv, S, D)
    v: torch.Tensor,
    mask: torch.Tensor | None,  # bool (True = attend) or additive, broadcast to (N, H, n, S); None = all
    scale: float,
    softcap: float | None,
    sinks: torch.Tensor | None,  # (1, H, 1, 1)
    dropout: float,
    groups: int,
) -> torch.Tensor:
    """Scores computed in the open, as the families' eager attention does, for what SDPA cannot do:
    soft-capped logits (Gemma 2) and a sink logit per head (gpt-oss). Softmax in fp32; (N, H, n, D)."""
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-1, -2)).float() * scale  # (N, H, n, S)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None and mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    elif mask is not None:
        scores = scores + mask
    if sinks is not None:
        scores = torch.cat([scores, sinks.float().expand(*scores.shape[:-1], 1)], dim=-1)
    probs = scores.softmax(-1)
    if sinks is not None:
        probs = probs[..., :-1]  # the sink takes its share of the mass and gives nothing back
    probs = F.dropout(probs, p=dropout, training=dropout > 0).to(v.dtype)
    return probs @ v


def _boundaries(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) positions restarting at each example -> segment boundaries over the flattened tokens."""
    b, t = position_ids.shape
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    idx = starts.reshape(-1).nonzero().view(-1)
    return torch.cat([idx, idx.new_tensor([b * t])]).to(torch.int32)


def segment_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
):
    """No mask for a cache-free, unpadded forward (causality and segments are the attention's job);
    otherwise the SDPA mask, so padded batches and generation behave as under "sdpa"."""
    if attention_mask is None and q_length == kv_length and not q_offset and not kv_offset:
        return None
    return sdpa_mask(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        attention_mask=attention_mask,
        **kwargs,
    )


AttentionInterface.register(NAME, segment_attention)
AttentionMaskInterface.register(NAME, segment_mask)


def enable_segment_attention(model: torch.nn.Module, prefer_flash: bool = True) -> str:
    """Make `model` (a transformers model, or a peft wrapper around one) honour packed-row boundaries.

    Returns the implementation set: "flash_attention_3"/"flash_attention_2" when `prefer_flash`, the
    model sits on CUDA in fp16/bf16, the package is installed and its varlen kernel takes every variant
    the model's layers use (transformers' flash path passes `sliding_window` as `window_size`, `softcap`,
    and `s_aux` as a sink, but drops a sink, or a window, the kernel does not take); "strop_segments"
    otherwise. Raises ConfigError (naming `train.batch_tokens` and the model type) where the layers pass
    what segment attention cannot honour: one packed forward of four tokens finds it before training.
    """
    base = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    if base is None:
        raise TypeError(f"{type(model).__name__} holds no transformers PreTrainedModel")
    _set(base, NAME)
    variants = _probe(base)
    param = next(base.parameters())
    if prefer_flash and param.device.type == "cuda" and param.dtype in (torch.float16, torch.bfloat16):
        for impl, package in (
            ("flash_attention_3", "flash_attn_interface"),
            ("flash_attention_2", "flash_attn"),
        ):
            if importlib.util.find_spec(package) is not None and _flash_takes(package, variants):
                _set(base, impl)
                return impl
    return NAME


def _set(base: PreTrainedModel, name: str) -> None:
    base.set_attn_implementation(name)
    if base.config._attn_implementation != name:
        raise RuntimeError(
            f"{type(base).__name__} does not let its attention implementation be set to {name!r} "
            "(it does not dispatch through transformers' AttentionInterface); packing needs it"
        )


def _probe(base: PreTrainedModel) -> set[str]:
    """The attention variants (`sliding_window`, `softcap`, `s_aux`) the model's layers pass, from one
    no-grad forward of a packed row of two 2-token examples; segment attention raises on anything else."""
    global _probe_seen
    device = next(base.parameters()).device
    cu = torch.tensor([0, 2, 4], dtype=torch.int32, device=device)
    batch = {
        "input_ids": torch.zeros((1, 4), dtype=torch.long, device=device),  # id 0 is in every vocabulary
        "position_ids": torch.tensor([[0, 1, 0, 1]], device=device),
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": 2,
        "max_length_k": 2,
    }
    modes, _probe_seen = [(m, m.training) for m in base.modules()], set()
    try:
        base.eval()  # no dropout, no gradient checkpointing; each module's own mode is put back below
        with torch.no_grad():
            base(**batch, use_cache=False)
        return _probe_seen
    finally:
        for m, training in modes:
            m.training = training
        _probe_seen = None


# the flash-attention varlen arguments that carry each variant (FA3 builds call the sink s_aux, FA4
# learnable_sink); transformers silently leaves out what the installed kernel does not take
_FLASH_ARGS = {
    "sliding_window": ("window_size",),
    "softcap": ("softcap",),
    "s_aux": ("s_aux", "learnable_sink"),
}


def _flash_takes(package: str, variants: set[str]) -> bool:
    params = inspect.signature(importlib.import_module(package).flash_attn_varlen_func).parameters
    return all(any(arg in params for arg in _FLASH_ARGS[v]) for v in variants)
