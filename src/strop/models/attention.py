"""Attention confined to each packed example, registered at transformers' attention extension point.

`segment_attention` runs causal SDPA separately on every segment of a packed row, so no token attends
across examples and no dense (T x T) block-diagonal mask is ever built: a row of 1024 tokens holding
eight examples costs eight small causal attentions instead of one masked 1024 x 1024 one. It works
on any device and dtype (CPU included). Where flash-attention is installed (CUDA, fp16/bf16),
`enable_segment_attention` picks transformers' own "flash_attention_2"/"_3" instead: it reads the
same `cu_seq_lens_q/k` and `max_length_q/k` keys of a packed batch (`strop.data.packing`).

How a packed batch reaches the attention (transformers 5.x, Llama and GPT-2 alike): `model(**kwargs)`
forwards unknown keyword arguments through the decoder layers into the attention interface, and the
models hand `position_ids` down the same way. `position_ids` restart at 0 per example, which is what
both rotary (Llama) and learned absolute (GPT-2) position embeddings need to match unpacked.

The mask function registered beside it builds no mask when there is nothing to mask beyond
causality (no 2-D attention_mask, no cache), and otherwise defers to the SDPA mask, so a model left on
"strop_segments" still runs ordinary padded batches and generation exactly as with "sdpa".
"""

from __future__ import annotations

import importlib.util
import itertools

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

NAME = "strop_segments"


def segment_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # (B, H, T, D)
    key: torch.Tensor,  # (B, H_kv, T, D)
    value: torch.Tensor,  # (B, H_kv, T, D)
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Causal attention within each segment of each row; returns (B, T, H, D) like the SDPA interface.

    Segments come from `cu_seq_lens_q` (boundaries over the flattened B * T tokens), else from
    `position_ids` restarting at 0 (transformers' packed-sequence convention). Without either, or with a
    real mask or a cache, this is plain SDPA.
    """
    b, h, t, d = query.shape
    unmasked = attention_mask is None and key.shape[2] == t and t > 1
    if cu_seq_lens_q is None and unmasked and position_ids is not None and position_ids.ndim == 2:
        cu_seq_lens_q = _boundaries(position_ids.expand(b, -1))
    if cu_seq_lens_q is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if not unmasked:
        raise ValueError(
            "a packed batch carries its boundaries in cu_seq_lens_q: pass no attention_mask and no filled cache"
        )

    bounds = cu_seq_lens_q.tolist()  # one host sync per layer; a row of 1024 tokens has ~10 boundaries
    if bounds[0] != 0 or bounds[-1] != b * t:
        raise ValueError(f"cu_seq_lens_q must run from 0 to {b * t} (all {b} x {t} tokens), got {bounds}")
    if len(bounds) - 1 == b:  # one segment per row: an ordinary causal batch
        return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling)
    if not set(range(0, b * t, t)) <= set(bounds):
        raise ValueError(f"a segment crosses a row boundary (rows of {t} tokens): {bounds}")
    gqa = getattr(module, "num_key_value_groups", 1) > 1
    lens = [end - start for start, end in itertools.pairwise(bounds)]

    def segments(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # (B, H, T, D) -> (B*T, H, D), a view for the (B, T, H, D) memory projections produce; split's
        # backward is then a single cat, and segments follow cu_seq_lens' flattened order
        return x.transpose(1, 2).reshape(b * t, x.shape[1], x.shape[3]).split(lens)

    outs = [
        F.scaled_dot_product_attention(
            q.transpose(0, 1)[None],
            k.transpose(0, 1)[None],
            v.transpose(0, 1)[None],
            dropout_p=dropout,
            scale=scaling,
            is_causal=True,
            enable_gqa=gqa,
        )[0].transpose(0, 1)  # (n, H, D)
        for q, k, v in zip(segments(query), segments(key), segments(value), strict=True)
    ]
    return torch.cat(outs).view(b, t, h, -1), None  # (B, T, H, D)


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
    model sits on CUDA in fp16/bf16 and the package is installed; "strop_segments" otherwise.
    """
    base = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    if base is None:
        raise TypeError(f"{type(model).__name__} holds no transformers PreTrainedModel")
    name = NAME
    param = next(base.parameters())
    if prefer_flash and param.device.type == "cuda" and param.dtype in (torch.float16, torch.bfloat16):
        for impl, package in (
            ("flash_attention_3", "flash_attn_interface"),
            ("flash_attention_2", "flash_attn"),
        ):
            if importlib.util.find_spec(package) is not None:
                name = impl
                break
    base.set_attn_implementation(name)
    if base.config._attn_implementation != name:
        raise RuntimeError(
            f"{type(base).__name__} does not let its attention implementation be set to {name!r} "
            "(it does not dispatch through transformers' AttentionInterface); packing needs it"
        )
    return name
