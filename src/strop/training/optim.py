"""Optimizers with weight decay only on matrices, and learning-rate schedules as pure functions of step.

A schedule that is a function of the step needs no saved state: resuming restores it exactly.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def build_optimizer(
    model: nn.Module,
    name: str,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    momentum: float,
    lr_ratios: dict[str, float] | None = None,
) -> torch.optim.Optimizer:
    """Biases and norm weights (1-D parameters) get no weight decay. `lr_ratios`: a parameter whose
    name has one of these parts (e.g. "lora_B", for LoRA+) learns at lr x its ratio (`set_lr`)."""
    ratios = lr_ratios or {}
    grouped: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for param_name, p in model.named_parameters():
        if p.requires_grad:
            parts = param_name.split(".")
            ratio = next((r for part, r in ratios.items() if part in parts), 1.0)
            grouped.setdefault((p.ndim >= 2, ratio), []).append(p)
    groups = [
        {"params": params, "weight_decay": weight_decay if decays else 0.0, "lr_ratio": ratio}
        for (decays, ratio), params in sorted(grouped.items(), key=lambda kv: (not kv[0][0], kv[0][1]))
    ]
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas)
    if name == "adam":
        # classic Adam adds decay to the gradient (L2); AdamW decouples it
        return torch.optim.Adam(groups, lr=lr, betas=betas)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    raise ValueError(f"unknown optimizer {name!r}")


def lr_factor(step: int, total_steps: int, schedule: str, warmup_steps: int) -> float:
    """Multiplier of the base learning rate for optimizer step `step` (0-based)."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {schedule!r}")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_ratio", 1.0)
