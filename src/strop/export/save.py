"""A trained model written as a folder every loader reads: the adapter (PEFT format) or the full model,
the tokenizer with the chat template the run trained with, and `strop_model.json`; or a classifier's
backbone and head. Written atomically."""

from __future__ import annotations

import json
from pathlib import Path

from strop.core.config import RunConfig
from strop.core.io import atomic_dir
from strop.data.template import ChatTemplate
from strop.models.catalogue import public_id
from strop.models.classifier import SequenceClassifier
from strop.models.load import strop_run
from strop.models.trainable import save_adapter_or_model


def export_model(
    out: Path, model, tokenizer, template: ChatTemplate, cfg: RunConfig, template_name: str
) -> Path:
    """Write the adapter (PEFT format) or the full model, the tokenizer with the training chat template,
    and `strop_model.json`, atomically."""
    base = cfg.model.name
    if cfg.model.adapter == "continue":  # the adapter grew from that run's, over that run's own base
        run = strop_run(base)
        assert run is not None  # build_causal_lm refuses adapter: continue for anything but a strop run
        base = run["base_model"]
    if Path(base).expanduser().exists():
        base = str(Path(base).expanduser().resolve())
    meta = {
        "base_model": base,
        "keep_layers": cfg.model.keep_layers if cfg.method.name == "lora" else None,
        "method": cfg.method.name,
        "template": template.source,
        "template_name": template_name,
        "system_prompt": template.system_prompt,
        "base_model_hub_id": public_id(base),
    }

    def fill(tmp: Path) -> None:
        save_adapter_or_model(model, tmp)
        name_base_publicly(tmp, public_id(base))
        tokenizer.chat_template = template.source
        tokenizer.save_pretrained(tmp)
        (tmp / "strop_model.json").write_text(json.dumps(meta, indent=2))

    return atomic_dir(out, fill)


def name_base_publicly(folder: Path, name: str) -> None:
    """peft writes the base model's local folder (for a catalogue model, this machine's cache) into
    adapter_config.json and its model card; name it as other machines can find it. strop itself loads
    the base through strop_model.json's `base_model`, so it still works offline."""
    config = folder / "adapter_config.json"
    if not config.is_file():
        return
    data = json.loads(config.read_text())
    local = data.get("base_model_name_or_path")
    data["base_model_name_or_path"] = name
    config.write_text(json.dumps(data, indent=2, sort_keys=True))
    card = folder / "README.md"
    if local and card.is_file():
        card.write_text(card.read_text().replace(local, name))


def export_classifier(
    out: Path, model: SequenceClassifier, tokenizer, cfg: RunConfig, extra: dict | None = None
) -> Path:
    """The classifier folder with `strop_model.json` (task, base model, method, labels), atomically."""
    base = cfg.model.name
    if Path(base).expanduser().exists():
        base = str(Path(base).expanduser().resolve())
    meta = {
        "task": cfg.task,
        "base_model": base,
        "method": cfg.method.name,
        "labels": model.labels,
        "keep_layers": cfg.model.keep_layers,
        **(extra or {}),
    }

    def fill(tmp: Path) -> None:
        model.save(tmp, cfg.model.keep_layers)
        tokenizer.save_pretrained(tmp)
        (tmp / "strop_model.json").write_text(json.dumps(meta, indent=2))

    return atomic_dir(out, fill)
