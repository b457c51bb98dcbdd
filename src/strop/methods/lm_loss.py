"""The LM head and its cross-entropy, fused and chunked: logits only where a label is, never all at once.

A causal LM's loss usually materializes (B, T, V) logits, keeps them (and their float32 copy) for
backward, and spends the head's matmul on prompt and padding positions that carry no label. Here the
caller runs the backbone, picks the N hidden states that predict a label, and `linear_cross_entropy`
walks them in chunks: per chunk it forms (chunk, V) float32 logits, adds their cross-entropy to the
sum and, while the chunk is at hand, its gradients wrt the hidden states and the head weight. So logit
memory is O(chunk x V) and backward only scales the stored gradients.
Approach of Liger-Kernel's fused linear cross entropy (Hsu et al. 2024, https://arxiv.org/abs/2410.10989).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.autograd.function import once_differentiable

# Config fields of transformers causal LMs that change logits after the head (softcapping, scaling).
# A model that sets one goes through the standard full-logits path.
_LOGIT_TRANSFORMS = (
    "final_logit_softcapping",
    "logit_softcapping",
    "softcap",
    "logit_scale",
    "logits_scaling",
    "output_multiplier",
    "lm_head_multiplier",
)


def hidden_and_head(model: nn.Module) -> tuple[Callable, nn.Linear] | None:
    """(backbone, lm_head) of a transformers causal LM, plain or wrapped by peft; None when the fast
    path cannot reproduce the model's logits and callers must use `model(...).logits`.

    The backbone is the base model's own (LoRA layers are injected in place, so it runs the adapters);
    `backbone(input_ids=..., ...)` returns an output whose `last_hidden_state` feeds the head.
    """
    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is not None and peft_config.is_prompt_learning:
        return None  # virtual tokens are added by PeftModel.forward, not by the backbone
    # torch's stubs type an nn.Module's attributes Tensor | Module; these are peft's and transformers' methods
    core = model.get_base_model() if hasattr(model, "get_base_model") else model  # type: ignore[operator]
    head = core.get_output_embeddings() if hasattr(core, "get_output_embeddings") else None  # type: ignore[operator]
    backbone = getattr(core, getattr(core, "base_model_prefix", ""), None)
    # exactly nn.Linear: a LoRA- or modules_to_save-wrapped head is some other module
    if type(head) is not nn.Linear or head.bias is not None or not isinstance(backbone, nn.Module):
        return None
    configs = [core.config, getattr(core.config, "text_config", None)]
    for name in _LOGIT_TRANSFORMS:
        if getattr(core, name, None) is not None or any(getattr(c, name, None) is not None for c in configs):
            return None
    return backbone, head


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int = 1024
) -> torch.Tensor:
    """Sum over rows of cross_entropy(hidden @ weight.T, targets), computed in float32 chunks.

    hidden (N, d), weight (V, d), targets (N,) of valid class ids (no ignore index: select rows first).
    Returns a float32 scalar. Gradients are computed during the forward only when grad mode is on and
    hidden or weight requires grad; under no_grad (evaluation) this is just the chunked loss.
    """
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_size)
    return _chunked(hidden, weight, targets, chunk_size, need_h=False, need_w=False)[0]


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size):
        need_h, need_w = ctx.needs_input_grad[:2]
        total, grad_h, grad_w = _chunked(hidden, weight, targets, chunk_size, need_h, need_w)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = hidden.dtype, weight.dtype
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        dtype_h, dtype_w = ctx.dtypes
        dh = (grad_h * grad_out).to(dtype_h) if ctx.needs_input_grad[0] else None
        dw = (grad_w * grad_out).to(dtype_w) if ctx.needs_input_grad[1] else None
        return dh, dw, None, None


def _chunked(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int,
    need_h: bool,
    need_w: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(loss sum, d loss/d hidden (N, d) or None, d loss/d weight (V, d) or None), all float32."""
    n = hidden.size(0)
    w = weight.float()  # (V, d); no copy when the head is already float32
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_h = torch.empty((n, w.size(1)), dtype=torch.float32, device=hidden.device) if need_h else None
    grad_w = torch.zeros_like(w) if need_w else None
    # one (chunk, V) buffer reused by every chunk: the only vocabulary-sized tensor
    buf = torch.empty((min(chunk_size, n), w.size(0)), dtype=torch.float32, device=hidden.device)
    for start in range(0, n, chunk_size):
        h = hidden[start : start + chunk_size].float()  # (c, d)
        t = targets[start : start + chunk_size]  # (c,)
        logits = torch.mm(h, w.T, out=buf[: h.size(0)])  # (c, V)
        # log-sum-exp in place (max, exp, sum), without the temporaries torch.logsumexp allocates
        top = logits.amax(dim=-1, keepdim=True)  # (c, 1)
        target_logit = logits.gather(1, t[:, None])  # (c, 1)
        exp = logits.sub_(top).exp_()  # (c, V)
        norm = exp.sum(dim=-1, keepdim=True)  # (c, 1)
        total += (top + norm.log() - target_logit).sum()
        if need_h or need_w:
            # d CE / d logits = softmax - one_hot(target), formed in place of the logits
            dlogits = exp.div_(norm)
            dlogits[torch.arange(t.numel(), device=t.device), t] -= 1.0
            if grad_h is not None:  # need_h
                torch.mm(dlogits, w, out=grad_h[start : start + chunk_size])  # (c, d)
            if grad_w is not None:  # need_w
                grad_w.addmm_(dlogits.T, h)  # (V, d)
    return total, grad_h, grad_w
