"""What the server serves: one base model and the LoRA runs on it, each a model name with its own
chat template and end-of-turn ids; the base is loaded once and every adapter rides on it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from strop.core.errors import ConfigError
from strop.data.template import ChatTemplate
from strop.models.engine import BASE
from strop.models.inference import Loaded, load_for_inference
from strop.models.load import load_tokenizer, read_run_model, resolve_source


@dataclass(frozen=True)
class Variant:
    name: str
    adapter: str  # the engine's adapter name: BASE, a run's own "default", or --adapter's NAME
    template: ChatTemplate
    description: str

    @property
    def stop_ids(self) -> frozenset[int]:
        return frozenset(self.template.stop_ids)


def model_name(target: str) -> str:
    """A run or model folder is served by its folder's name, a catalogue name or hub id as it is."""
    p = Path(target).expanduser()
    return p.resolve().name if p.is_dir() else target


def load_variants(target: str, adapters: dict[str, str], device: str) -> tuple[Loaded, dict[str, Variant]]:
    """The base (a model, or a run with its own adapter) and every `--adapter NAME=RUN` on it."""
    loaded = load_for_inference(target, device=device)
    main = read_run_model(Path(target)) if Path(target).is_dir() else None
    main_lora = main is not None and main["method"] == "lora"
    base = _base_of(main, target)
    name = model_name(target)
    variants = {name: Variant(name, "default" if main_lora else BASE, loaded.template, loaded.description)}
    model = loaded.model
    for adapter_name, run_dir in adapters.items():
        key = f"--adapter {adapter_name}={run_dir}"
        if adapter_name in variants or adapter_name in (BASE, "default"):
            raise ConfigError(f"{key}: the name {adapter_name!r} is taken; give this adapter another name")
        run = read_run_model(Path(run_dir)) if Path(run_dir).is_dir() else None
        if run is None:
            raise ConfigError(f"{key}: {run_dir} is not a finished strop run (no model/strop_model.json)")
        if run["method"] != "lora":
            raise ConfigError(f"{key}: a {run['method']} run holds a whole model; serve it on its own")
        if _base_of(run, run_dir) != base or run.get("keep_layers") != (main or {}).get("keep_layers"):
            raise ConfigError(
                f"{key}: trained on {run['base_model']}, but the served base is {base}; "
                "adapters must share the served model's base"
            )
        tok = load_tokenizer(run["dir"])
        if tok.get_vocab() != loaded.tokenizer.get_vocab():  # type: ignore[attr-defined]
            raise ConfigError(f"{key}: its tokenizer differs from the served model's")
        if hasattr(model, "peft_config"):
            model.load_adapter(run["dir"], adapter_name=adapter_name)  # type: ignore[operator]
        else:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, run["dir"], adapter_name=adapter_name)
        template = ChatTemplate(tok, run["template"], run.get("system_prompt"))
        variants[adapter_name] = Variant(adapter_name, adapter_name, template, f"{run_dir} (LoRA on {base})")
    if adapters and any(type(m).__name__ == "ParamWrapper" for m in model.modules()):
        # peft's LoRA on parameters (MoE experts) runs one adapter at a time: rows of different
        # variants could never share a batch, so the server is refused before it listens
        kind = getattr(getattr(model, "config", None), "model_type", "this model")
        raise ConfigError(
            f"--adapter: {kind}: its LoRA adapters reach expert parameters (a mixture "
            "of experts), which peft cannot mix in one batch; serve one adapter per server"
        )
    model.eval()
    loaded.model = model
    return loaded, variants


def _base_of(run: dict | None, target: str) -> str:
    """The weights under any adapter: a LoRA run's base model, else the model itself."""
    if run is None:
        return resolve_source(target)
    if run["method"] == "lora":
        return resolve_source(run["base_model"])
    return str(Path(run["dir"]).resolve())
