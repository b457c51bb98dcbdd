"""Choose what trains: every weight (full), the last blocks (freeze), or LoRA adapters (peft).

Full, freeze and LoRA SFT share one objective; only this trainable set differs.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from strop.core.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from strop.models.classifier import SequenceClassifier

log = logging.getLogger("strop.models")


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's stack of transformer blocks: model.layers / transformer.h where they exist, else the
    longest ModuleList (an MoE expert list can be longer than the block list, so it is only the fallback)."""
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        node: object = model
        for part in path.split("."):
            node = getattr(node, part, None)
        if isinstance(node, nn.ModuleList):
            return path, node
    best = max(
        ((n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList)),
        key=lambda nm: len(nm[1]),
        default=None,
    )
    if best is None:
        raise ConfigError("method.freeze: could not find the model's list of transformer blocks")
    return best


def apply_full(model: nn.Module) -> nn.Module:
    model.requires_grad_(True)
    return model


def apply_freeze(
    model: PreTrainedModel, train_last_n_blocks: int, train_patterns: list[str], train_lm_head: bool
) -> nn.Module:
    model.requires_grad_(False)
    prefix, blocks = decoder_blocks(model)
    n = min(train_last_n_blocks, len(blocks))
    for block in list(blocks)[len(blocks) - n :]:
        block.requires_grad_(True)
    patterns = [re.compile(p) for p in train_patterns]
    for name, p in model.named_parameters():
        if any(rx.search(name) for rx in patterns):
            p.requires_grad_(True)
    if train_lm_head:
        model.get_output_embeddings().requires_grad_(True)
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(
            "method.freeze: nothing left to train; raise train_last_n_blocks or add train_patterns"
        )
    log.info(
        "freeze: training the last %d of %d blocks in %s%s",
        n,
        len(blocks),
        prefix,
        f" and parameters matching {train_patterns}" if train_patterns else "",
    )
    return model


def apply_lora(
    model: nn.Module,
    r: int,
    alpha: float,
    dropout: float,
    target_modules: str | list[str],
    task_type: str = "CAUSAL_LM",
    use_dora: bool = False,
    use_rslora: bool = False,
    init: str = "default",
):
    """`task_type`: CAUSAL_LM for a model with its LM head, FEATURE_EXTRACTION for a bare backbone.
    `init` pissa or olora moves part of each base weight into the adapter; the starting adapter is kept
    (`initial_adapter`) so the saved one can be converted to plain LoRA over the original weights."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r,
        lora_alpha=alpha,  # type: ignore[arg-type]  # peft annotates int; scaling is alpha / r, floats work
        lora_dropout=dropout,
        target_modules=target_modules,
        task_type=task_type,
        use_dora=use_dora,
        use_rslora=use_rslora,
        init_lora_weights=True if init == "default" else init,  # type: ignore[arg-type]
    )
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as e:
        if "lora_dropout" in str(e):  # peft's LoRA on parameters (MoE experts, in all-linear) has none
            kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
            raise ConfigError(
                f"method.lora.dropout: {dropout} on {kind}: LoRA on its expert parameters (a mixture of "
                "experts, which all-linear includes) takes no dropout; set method.lora.dropout: 0, or "
                "list target_modules without the experts"
            ) from None
        raise ConfigError(f"method.lora.target_modules: {e}") from None
    if init in MUTATING_INITS:
        keep_initial_adapter(peft_model)
    return peft_model


MUTATING_INITS = ("pissa", "olora")  # they subtract the adapter's start from the base weights


def keep_initial_adapter(peft_model) -> None:
    """Save the adapter as it starts into a folder that lives as long as the process: the export turns
    the trained adapter into plain LoRA over the original weights with it (PEFT's
    path_initial_model_for_weight_conversion: rank 2r, [A | A0], [B | -B0])."""
    import atexit
    import shutil
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="strop-lora-init-"))
    atexit.register(shutil.rmtree, root, True)
    cfg = peft_model.peft_config["default"]
    init, cfg.init_lora_weights = cfg.init_lora_weights, True  # loading it must not decompose again
    try:
        peft_model.save_pretrained(root / "initial", safe_serialization=True)
    finally:
        cfg.init_lora_weights = init
    peft_model.strop_initial_adapter = str(root / "initial")


def initial_adapter(model) -> str | None:
    """The folder `keep_initial_adapter` wrote for this model (pissa, olora), else None."""
    return getattr(model, "strop_initial_adapter", None)


def apply_method(model: PreTrainedModel, method) -> nn.Module:
    """The trainable set a `MethodConfig` asks for: LoRA adapters, the last blocks, or everything."""
    if method.name == "lora":
        lora = method.lora
        return apply_lora(
            model,
            lora.r,
            lora.alpha,
            lora.dropout,
            lora.target_modules,
            use_dora=lora.use_dora,
            use_rslora=lora.use_rslora,
            init=lora.init,
        )
    if method.name == "freeze":
        f = method.freeze
        return apply_freeze(model, f.train_last_n_blocks, f.train_patterns, f.train_lm_head)
    return apply_full(model)


def apply_classifier_method(clf: SequenceClassifier, method) -> SequenceClassifier:
    """The trainable set of a SequenceClassifier: its head always; of the backbone nothing (`head`),
    the last blocks (`freeze`), LoRA adapters (`lora`) or everything (`full`)."""
    if method.name == "lora":
        lora = method.lora
        clf.backbone = apply_lora(
            clf.backbone,
            lora.r,
            lora.alpha,
            lora.dropout,
            lora.target_modules,
            "FEATURE_EXTRACTION",
            use_dora=lora.use_dora,
            use_rslora=lora.use_rslora,
            init=lora.init,
        )
    elif method.name == "freeze":
        f = method.freeze
        apply_freeze(clf.backbone, f.train_last_n_blocks, f.train_patterns, False)
    else:
        clf.backbone.requires_grad_(method.name == "full")
    clf.head.requires_grad_(True)
    return clf


def keep_blocks(model: PreTrainedModel, n: int) -> PreTrainedModel:
    """Keep `n` of the model's blocks, evenly spaced, the first and the last among them: a smaller
    model initialised from a bigger one's layers (a distillation student, as DistilBERT's every other
    layer). Blocks are renumbered so a KV cache indexes them correctly."""
    prefix, blocks = decoder_blocks(model)
    if n >= len(blocks):
        raise ConfigError(f"model.keep_layers: {n} is not fewer than the model's {len(blocks)} blocks")
    keep = sorted({round(i * (len(blocks) - 1) / max(1, n - 1)) for i in range(n)})
    kept = nn.ModuleList([blocks[i] for i in keep])
    for new, block in enumerate(kept):
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new  # type: ignore[assignment]  # torch's stubs allow Tensor | Module only
    parent = model.get_submodule(prefix.rsplit(".", 1)[0]) if "." in prefix else model
    setattr(parent, prefix.rsplit(".", 1)[-1], kept)
    config = model.config
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in keep]
    for key in ("num_hidden_layers", "n_layer"):
        if hasattr(config, key):
            setattr(config, key, len(kept))
    log.info("kept blocks %s of %d (%s)", keep, len(blocks), prefix)
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights counted once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def save_adapter_or_model(model, folder: Path) -> None:
    """save_pretrained in safetensors; an adapter that began as pissa or olora (which moved part of the
    base weights into it) is saved converted to plain LoRA of twice the rank over the original weights,
    so it loads on the base model as any adapter does."""
    initial = initial_adapter(model)
    if initial is None:
        model.save_pretrained(folder, safe_serialization=True)
    else:
        model.save_pretrained(
            folder, safe_serialization=True, path_initial_model_for_weight_conversion=initial
        )
