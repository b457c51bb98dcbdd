"""One model builder for every task: load -> keep_layers -> method -> gradient checkpointing -> precision.

The precision policy: weights that train stay float32 (a bf16 update of a bf16 weight rounds to nothing
once the step is small against the weight) and the forward pass runs in the run's dtype by autocast. It
applies to the methods whose base weights train (full, freeze); LoRA's adapters and a classifier's head
are created in float32 over base weights kept in the run's dtype, so they need no autocast.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from strop.core.config import RunConfig
from strop.core.errors import ConfigError
from strop.models.classifier import SequenceClassifier, default_pooling, load_backbone
from strop.models.load import load_model, strop_run
from strop.models.trainable import apply_classifier_method, apply_method, keep_blocks

log = logging.getLogger("strop.models")


def precision(cfg: RunConfig, dtype: torch.dtype) -> tuple[torch.dtype, torch.dtype | None]:
    """(dtype to load the weights in, dtype the forward autocasts to, or None for no autocast)."""
    if dtype == torch.float32 or cfg.method.name in ("lora", "head"):
        return dtype, None
    return torch.float32, dtype


def build_causal_lm(
    cfg: RunConfig, device: torch.device, dtype: torch.dtype
) -> tuple[nn.Module, torch.dtype | None]:
    """The run's causal LM with its trainable set; returns (model, autocast dtype)."""
    weights, amp = precision(cfg, dtype)
    continuing = cfg.model.adapter == "continue"  # the LoRA adapter of a strop run trains further
    if continuing and strop_run(cfg.model.name) is None:
        raise ConfigError(
            f"model.adapter: continue trains the LoRA adapter of a strop run further, but model.name "
            f"{cfg.model.name!r} is not a strop run; use adapter: merge (the default) for any other model"
        )
    model = load_model(
        cfg.model.name,
        device,
        weights,
        cfg.model.trust_remote_code,
        adapter="train" if continuing else "merge",
    )
    if cfg.model.keep_layers:
        keep_blocks(model, cfg.model.keep_layers)
    if not continuing:
        model = apply_method(model, cfg.method)
    _checkpointing(model, cfg)
    return model, amp


def build_classifier(
    cfg: RunConfig, labels: list[str], device: torch.device, dtype: torch.dtype
) -> tuple[SequenceClassifier, torch.dtype | None]:
    """A backbone (encoder or causal LM) with a head over `labels`, its trainable set chosen by the method
    (classification, and reward models with the single label "reward"); returns (model, autocast dtype)."""
    weights, amp = precision(cfg, dtype)
    backbone = load_backbone(cfg.model.name, device, weights, cfg.model.trust_remote_code)
    if cfg.model.keep_layers:
        keep_blocks(backbone, cfg.model.keep_layers)
    c = cfg.classify
    pooling = default_pooling(backbone.config) if c.pooling == "auto" else c.pooling
    model = SequenceClassifier(backbone, labels, pooling, c.head_layers, c.head_dropout).to(device)
    model = apply_classifier_method(model, cfg.method)
    _checkpointing(model.backbone, cfg)
    return model, amp


def _checkpointing(model: nn.Module, cfg: RunConfig) -> None:
    """train.gradient_checkpointing: recompute activations in the backward pass (less memory, ~30% more
    compute). Non-reentrant, so it works with LoRA and frozen embeddings."""
    if not cfg.train.gradient_checkpointing:
        return
    if cfg.method.name == "head":
        log.info("train.gradient_checkpointing: nothing to recompute, only the head trains")
        return
    kwargs = {"use_reentrant": False}
    # torch's stubs type an nn.Module's attributes Tensor | Module; these are transformers' methods
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)  # type: ignore[operator]
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)  # type: ignore[operator]
    else:
        raise ConfigError(f"train.gradient_checkpointing: {type(model).__name__} does not support it")
