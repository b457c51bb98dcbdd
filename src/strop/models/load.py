"""Resolve `model.name` to a loadable folder and load model + tokenizer on the chosen device/dtype.

Sources, in order: a catalogue name, a .gguf file, a local Hugging Face folder, a hub id (online).
A strop run (or its `model/` folder) is a source too: its full weights, or its LoRA adapter over its own
base model (which may itself be a strop run: the stages of sequential fine-tuning chain this way).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import warnings
from pathlib import Path

import torch

from strop.core.errors import ConfigError, StropError
from strop.core.io import unreadable_file
from strop.models.catalogue import CATALOGUE, convert_gguf, gguf_cache_dir, pull

log = logging.getLogger("strop.models")


def resolve_source(name: str, causal_lm: bool = True) -> str:
    """A local folder for catalogue/GGUF/local sources; the hub id itself when online. `causal_lm=False`
    (classification) also accepts the catalogue's encoders."""
    if name in CATALOGUE:
        if causal_lm and not CATALOGUE[name].causal_lm:
            raise ConfigError(
                f"model.name: {name!r} is an encoder (for classification and embeddings), not a causal language "
                "model; SFT, chat and generation need one such as smollm2-135m-instruct"
            )
        return str(pull(name))
    p = Path(name).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise StropError(f"model.name: GGUF file not found: {p}")
        out = gguf_cache_dir(p)
        return str(out if (out / "config.json").is_file() else convert_gguf(p, out))
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise StropError(
                f"model.name: {p} is a folder but holds no config.json (not a Hugging Face model)"
            )
        return str(p)
    if p.is_symlink():  # a link whose target is missing or loops back
        raise StropError(f"model.name: {p}: {unreadable_file(p) or 'cannot be read'}")
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        _require_hub(name)
        return name
    raise ConfigError(
        f"model.name: {name!r} is not a catalogue model ({', '.join(CATALOGUE)}), an existing folder, "
        "a .gguf file, or a Hugging Face hub id (org/name)"
    )


def _require_hub(repo_id: str) -> None:
    """Fail at once, with a way forward, when the hub cannot be reached (instead of ~30 s of retries)."""
    hint = (
        f"model.name: {repo_id!r} looks like a Hugging Face hub id, but the hub is not reachable "
        "({why}). Download it on a connected machine (huggingface-cli download {id} --local-dir DIR) "
        "and set model.name to that local folder, or use a catalogue model: {cat}"
    )
    cached = _hub_cache_has(repo_id)
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        if cached:
            return
        raise StropError(hint.format(why="HF_HUB_OFFLINE=1", id=repo_id, cat=", ".join(CATALOGUE)))
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
    except OSError as e:
        if cached:
            os.environ["HF_HUB_OFFLINE"] = "1"
            return
        raise StropError(hint.format(why=f"network: {e}", id=repo_id, cat=", ".join(CATALOGUE))) from None


def _hub_cache_has(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - a broken cache just means "not cached"
        return False


PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def check_model_folder(source: str, trust_remote_code: bool = False) -> None:
    """Refuse, before transformers sees it, what would run code from a local model folder: weights only
    in pickle files (unpickling can execute anything) and custom model code (config.json's `auto_map`)
    unless `model.trust_remote_code` allows it, which is then logged, naming the folder."""
    p = Path(source).expanduser()
    if trust_remote_code and source not in _TRUSTED:
        _TRUSTED.add(source)
        log.warning(
            "model.trust_remote_code is true: transformers may run Python code that comes with %s", source
        )
    if not p.is_dir():
        return
    if (p / "adapter_config.json").is_file():
        check_adapter_folder(p)
        return
    pickles = sorted(f.name for pattern in PICKLE_WEIGHTS for f in p.glob(pattern))
    if pickles and not any(p.glob("*.safetensors")):
        raise StropError(
            f"model.name: {p} holds its weights only as pickle ({', '.join(pickles[:3])}); strop loads "
            "safetensors only, since unpickling a file can run any code in it. If you trust the folder, "
            'convert it once: python -c "from transformers import AutoModelForCausalLM as M; '
            f"M.from_pretrained('{p}').save_pretrained('{p}-safetensors')\" and use that folder"
        )
    auto_map = _read_json(p / "config.json").get("auto_map") or _read_json(p / "tokenizer_config.json").get(
        "auto_map"
    )
    if auto_map and not trust_remote_code:
        raise StropError(
            f"model.name: {p} brings its own model code (auto_map: {', '.join(sorted(auto_map))}); strop "
            "runs it only with model.trust_remote_code: true, which executes the folder's Python files: "
            "set it only for a folder whose code you trust"
        )


def check_adapter_folder(folder: Path) -> None:
    """A PEFT adapter folder must hold its weights as safetensors (never unpickled)."""
    if (folder / "adapter_model.safetensors").is_file():
        return
    pickled = sorted(f.name for f in folder.glob("adapter_model.*"))
    raise StropError(
        f"{folder}: no adapter_model.safetensors"
        + (
            f" (only {', '.join(pickled)}: pickle, which strop does not load, since unpickling a file can "
            "run any code in it; re-save the adapter with save_pretrained(safe_serialization=True))"
            if pickled
            else " (not a complete LoRA run: was it copied in part?)"
        )
    )


_TRUSTED: set[str] = set()  # sources already warned about, so each is named once


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def from_pretrained(auto_class, source: str, trust_remote_code: bool = False, **kwargs):
    """`auto_class.from_pretrained` on safetensors only, after `check_model_folder`; transformers' own
    refusals (custom code on the hub, a folder without weights) become one-line errors."""
    from safetensors import SafetensorError

    check_model_folder(source, trust_remote_code)
    try:
        return auto_class.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)
    except SafetensorError as e:  # a weights file cut short (a copy or download that stopped) or not one
        raise StropError(f"model.name: {source}: a weights file is damaged ({e}); copy it again") from None
    except (OSError, ValueError) as e:
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, OSError) and e.errno is not None:
            raise  # the file system's own failure (a full disk, a read-only folder): the caller's to report
        raise StropError(f"model.name: cannot load {source}: {text}") from None


def load_tokenizer(source: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = from_pretrained(AutoTokenizer, source, trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(source: str, device: torch.device, dtype: torch.dtype, trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM

    t0 = time.time()
    model = from_pretrained(
        AutoModelForCausalLM, source, trust_remote_code, dtype=dtype, use_safetensors=True
    )
    model.to(device)
    log.info("loaded %s (%s, %s) in %.2f s", source, device, dtype, time.time() - t0)
    return model


def read_run_model(path: Path) -> dict | None:
    """The `strop_model.json` of a run's model folder: base model, method and template."""
    for candidate in (path / "model" / "strop_model.json", path / "strop_model.json"):
        if candidate.is_file():
            return {**json.loads(candidate.read_text()), "dir": str(candidate.parent)}
    return None


def strop_run(name: str) -> dict | None:
    """`read_run_model` for a `model.name` that is a strop run or model folder, else None."""
    p = Path(name).expanduser()
    return read_run_model(p) if p.is_dir() else None


def tokenizer_source(name: str, causal_lm: bool = True) -> str:
    """Where the tokenizer of `name` lives: a strop run saves its own (with its chat template)."""
    run = strop_run(name)
    return run["dir"] if run else resolve_source(name, causal_lm)


def architecture_source(name: str, causal_lm: bool = True) -> str:
    """The folder (or hub id) whose config.json describes the network of `name`."""
    run = strop_run(name)
    if run is None:
        return resolve_source(name, causal_lm)
    return architecture_source(run["base_model"], causal_lm) if run["method"] == "lora" else run["dir"]


def load_adapter(base, adapter_dir: str, trainable: bool = False):
    """A PEFT adapter over `base` (peft's own loader; saved in peft's format)."""
    from peft import PeftModel
    from safetensors import SafetensorError

    check_adapter_folder(Path(adapter_dir))
    with warnings.catch_warnings():  # peft reads transformers' deprecated `is_gradient_checkpointing`
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        try:
            return PeftModel.from_pretrained(base, adapter_dir, is_trainable=trainable)
        except SafetensorError as e:
            raise StropError(
                f"{adapter_dir}/adapter_model.safetensors is damaged ({e}); copy the run again"
            ) from None


def load_model(
    name: str,
    device: torch.device,
    dtype: torch.dtype,
    trust_remote_code: bool = False,
    adapter: str = "merge",
):
    """Any model source; for a strop LoRA run, `adapter` says what becomes of its adapter: `merge`
    (folded into plain weights), `keep` (a PeftModel for inference) or `train` (a trainable PeftModel)."""
    run = strop_run(name)
    if run is None:
        return load_causal_lm(resolve_source(name), device, dtype, trust_remote_code)
    if run["method"] != "lora":
        if adapter == "train":
            raise ConfigError(
                f"model.adapter: continue needs a LoRA run, but {run['dir']} holds a {run['method']} model"
            )
        return load_causal_lm(run["dir"], device, dtype, trust_remote_code)
    base = load_model(run["base_model"], device, dtype, trust_remote_code, "merge")
    if run.get("keep_layers"):  # the adapter was trained on a model cut to fewer blocks
        from strop.models.trainable import keep_blocks

        keep_blocks(base, run["keep_layers"])
    model = load_adapter(base, run["dir"], trainable=adapter == "train").to(device)
    if adapter == "merge":
        return model.merge_and_unload()
    return model


def check_same_tokenizer(teacher_tok, student_tok) -> None:
    """Distillation compares distributions token by token: the vocabularies must be the same."""
    a, b = teacher_tok.get_vocab(), student_tok.get_vocab()
    if a != b:
        diff = sorted(set(a.items()) ^ set(b.items()))[:3]
        raise ConfigError(
            f"distill.teacher: teacher and student tokenizers differ ({len(a)} vs {len(b)} tokens; e.g. "
            f"{diff}); distillation needs the same tokenizer"
        )
