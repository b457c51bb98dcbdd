"""`--quantize int8`: int8 weights for the linear layers, for faster inference on CPU.

torch's dynamic quantization (int8 weights per output channel, activations quantized per tensor on the
fly, x86/fbgemm kernels) is the only int8 path faster than fp32 on this CPU; torchao's int8 weight-only
and int8 dynamic configs were slower than fp32 here (bench/quantize.py has the figures).

Per-tensor activation scales are what it costs: the MLP's output projection (`down_proj`) reads the
activations with outlier channels, and the LM head ranks 50k logits, so quantizing those two wrecked
SmolLM2's perplexity (36 -> 117 on WikiText-2); they stay fp32 (`SKIP`), which keeps most of the speed.
A LoRA run with one adapter is merged first; several adapters on one base (strop serve) keep their LoRA
matrices in fp32 and quantize only the base's linear layers.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from strop.core.errors import ConfigError

KINDS = ("int8",)
SKIP = ("down_proj", "lm_head")  # linear layers left in fp32 (see above)


def quantize_model(
    model: nn.Module, kind: str, merge: bool = True, skip: tuple[str, ...] = SKIP
) -> nn.Module:
    """The model with int8 linear layers (CPU only); `merge`: fold a single LoRA adapter in first."""
    if kind not in KINDS:
        raise ConfigError(f"--quantize {kind}: expected one of {', '.join(KINDS)}")
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise ConfigError(
            f"--quantize {kind}: int8 dynamic quantization runs on the CPU only, but the model is on {device}; "
            "use --device cpu (on a GPU, bf16 is the fast path)"
        )
    if next(model.parameters()).dtype != torch.float32:
        raise ConfigError(
            f"--quantize {kind}: quantizes an fp32 model; the model is {next(model.parameters()).dtype}"
        )
    peft = getattr(model, "peft_config", None)
    if peft is not None and merge and len(peft) == 1:
        model = model.merge_and_unload()  # type: ignore[operator]
    # LoRA's own matrices stay fp32 (peft reads their .weight); so do the SKIP layers (peft wraps a layer
    # as NAME.base_layer, hence the parent's name is checked too)
    names = set()
    for name, m in model.named_modules():
        parts = name.split(".")
        last, parent = parts[-1], parts[-2] if len(parts) > 1 else ""
        if type(m) is not nn.Linear or last.startswith("lora_") or parent.startswith("lora_"):
            continue
        if last not in skip and not (last == "base_layer" and parent in skip):
            names.add(name)
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notice: the kernels are what we measured
        spec = {n: per_channel_dynamic_qconfig for n in names}
        return quantize_dynamic(model, spec, dtype=torch.qint8, inplace=True)
