"""Load a trained run (adapter or full model) or any model source for chat and generation, with the
same chat template the run was trained with."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from strop.core.device import resolve_device, resolve_dtype
from strop.core.errors import StropError
from strop.data.template import ChatTemplate, resolve_template
from strop.models.load import load_causal_lm, load_model, load_tokenizer, read_run_model, resolve_source


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    template: ChatTemplate
    device: torch.device
    description: str


def load_for_inference(
    target: str,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    quantize: str | None = None,
) -> Loaded:
    """`quantize`: "int8" for int8 linear layers on CPU (a LoRA run's adapter is merged first)."""
    if quantize and device == "auto":
        device = "cpu"  # int8 dynamic quantization is a CPU path
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    run = read_run_model(Path(target)) if Path(target).is_dir() else None
    if run is None and (Path(target) / "config.yaml").is_file() and (Path(target) / "checkpoints").is_dir():
        raise StropError(
            f"{target}: this run has not exported a model yet (it is unfinished); finish it with "
            f"`strop train --resume {target}`"
        )
    if run is None:
        source = resolve_source(target)
        tok = load_tokenizer(source, trust_remote_code)
        model = load_causal_lm(source, dev, dt, trust_remote_code)
        template = ChatTemplate(tok, resolve_template("auto", tok)[1])
        desc = target
    else:
        tok = load_tokenizer(run["dir"])
        model = load_model(run["dir"], dev, dt, trust_remote_code, adapter="keep")
        template = ChatTemplate(tok, run["template"], run.get("system_prompt"))
        desc = f"{target} ({run['method']} on {run['base_model']})"
    model.eval()
    if quantize:
        from strop.models.quantize import quantize_model

        model = quantize_model(model, quantize)
        desc += f", {quantize}"
    return Loaded(model, tok, template, dev, desc)
