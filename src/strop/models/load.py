"""Resolve `model.name` to a loadable folder and load model + tokenizer on the chosen device/dtype.

Sources, in order: a catalogue name, a .gguf file, a local Hugging Face folder, a hub id (online).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

import torch

from strop.core.errors import ConfigError, StropError
from strop.models.catalogue import CATALOGUE, convert_gguf, gguf_cache_dir, pull

log = logging.getLogger("strop.models")


def resolve_source(name: str) -> str:
    """A local folder for catalogue/GGUF/local sources; the hub id itself when online."""
    if name in CATALOGUE:
        if not CATALOGUE[name].causal_lm:
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


def load_tokenizer(source: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(source: str, device: torch.device, dtype: torch.dtype, trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM

    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=trust_remote_code)
    model.to(device)
    log.info("loaded %s (%s, %s) in %.2f s", source, device, dtype, time.time() - t0)
    return model


def read_run_model(path: Path) -> dict | None:
    """The `strop_model.json` of a run's model folder: base model, method and template."""
    for candidate in (path / "model" / "strop_model.json", path / "strop_model.json"):
        if candidate.is_file():
            return {**json.loads(candidate.read_text()), "dir": str(candidate.parent)}
    return None
