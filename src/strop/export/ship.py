"""`strop export`: a run or model as what other tools load. `gguf` is a GGUF file for llama.cpp and
Ollama with a Modelfile and a README beside it; `hf` is a merged transformers folder (what vLLM and
TGI load; the same as `strop merge`).

LoRA runs are merged first. The tokenizer and chat template are the ones the run trained with, and
the stop tokens are its end-of-turn ids, so the exported model stops where the tuned one does.

Nothing is replaced unless asked: an existing GGUF, Modelfile or README beside it (or a folder that is not
empty, for hf) is refused before any work unless `force`, and the input itself always is. Every file is
written to a temporary name and renamed into place.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from strop.core.errors import StropError
from strop.core.io import check_fresh_output, check_output
from strop.export.gguf_file import QUANTS, check_architecture, summarize, write_gguf
from strop.export.gguf_vocab import describe
from strop.export.merge import merge
from strop.export.ollama import modelfile

log = logging.getLogger("strop.export")

K_QUANTS = {"q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}  # llama.cpp's LLAMA_FTYPE_MOSTLY_*


@dataclass
class Exported:
    path: Path
    tensors: dict[str, str]  # GGUF tensor name -> type ({} for hf)
    files: list[Path]
    template_translated: bool = True


def export(target: str, fmt: str, quant: str, out: str | None, force: bool = False) -> Exported:
    if fmt == "hf":
        folder = Path(out or f"{Path(target).name}-hf")
        check_output(folder, "--out", folder=True)
        return Exported(merge(target, folder, force, option="--out"), {}, [folder])
    if fmt != "gguf":
        raise StropError(f"--format: expected gguf or hf, got {fmt!r}")
    if quant not in (*QUANTS, *K_QUANTS):
        raise StropError(f"--quantize: expected one of {', '.join((*QUANTS, *K_QUANTS))}, got {quant!r}")
    if quant in K_QUANTS:
        _llama_cpp_quantizer()  # refuse before the work
    name = Path(target).name.removesuffix(".gguf") or "model"
    path = Path(out or f"{name}-{quant}.gguf")
    if path.suffix != ".gguf":
        raise StropError(f"--out: {path} must end in .gguf")
    if path.is_dir():
        raise StropError(f"--out: {path} is a folder; give the file to write")
    for written in (path, path.with_name("Modelfile"), path.with_name(f"{path.stem}.README.md")):
        check_fresh_output(written, "--out", False, force, [target])
    from strop.models.inference import load_for_inference

    loaded = load_for_inference(target, device="cpu", dtype="float32")
    model: Any = loaded.model
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    check_architecture(model.config)
    path.parent.mkdir(parents=True, exist_ok=True)
    template = loaded.template
    vocab = describe(loaded.tokenizer, model.config.vocab_size, template.stop_ids)
    with torch.no_grad():
        if quant in K_QUANTS:
            tensors = _k_quant(model, vocab, template.source, path, quant, name)
        else:
            tensors = write_gguf(model, vocab, template.source, path, quant, name)
    tokenizer: Any = loaded.tokenizer
    stops = sorted({tokenizer.convert_ids_to_tokens(i) for i in template.stop_ids})
    text, translated = modelfile(path.name, template, stops)
    side = [
        _write(path.with_name("Modelfile"), text),
        _write(path.with_name(f"{path.stem}.README.md"), _readme(path, stops)),
    ]
    return Exported(path, tensors, [path, *side], translated)


def _write(path: Path, text: str) -> Path:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def _llama_cpp_quantizer():
    try:
        import llama_cpp
    except ImportError:
        raise StropError(
            f"--quantize: {', '.join(K_QUANTS)} are made by llama.cpp's quantizer, which needs llama-cpp-python "
            "(pip install llama-cpp-python); f16, q8_0 and q4_0 need nothing more"
        ) from None
    return llama_cpp


def _k_quant(model, vocab, chat_template: str, path: Path, quant: str, name: str) -> dict[str, str]:
    """An f16 file quantized by llama.cpp itself (K-quants fall back on rows not divisible by 256)."""
    import gguf

    llama_cpp = _llama_cpp_quantizer()
    f16 = path.with_name(path.stem + ".f16.partial.gguf")
    part = path.with_name(path.name + ".partial")
    try:
        write_gguf(model, vocab, chat_template, f16, "f16", name)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = K_QUANTS[quant]
        params.nthread = os.cpu_count() or 1
        if llama_cpp.llama_model_quantize(str(f16).encode(), str(part).encode(), params) != 0:
            raise StropError(f"export: llama.cpp could not quantize {f16.name} to {quant}")
        os.replace(part, path)
    finally:
        f16.unlink(missing_ok=True)
        part.unlink(missing_ok=True)
    reader = gguf.GGUFReader(str(path))
    return {t.name: t.tensor_type.name.lower() for t in reader.tensors}


def _readme(path: Path, stops: list[str]) -> str:
    return f"""# {path.stem}

Exported by `strop export` as GGUF, with the chat template the run trained with and its end-of-turn
tokens ({", ".join(f"`{s}`" for s in stops)}), so replies stop on their own.

## llama.cpp

    llama-cli -m {path.name} -cnv          # chat; the file's own template is used
    llama-server -m {path.name} --port 8080 # OpenAI-compatible server at http://127.0.0.1:8080/v1

## Ollama

    ollama create {path.stem.replace("_", "-").lower()} -f Modelfile
    ollama run {path.stem.replace("_", "-").lower()}

The Modelfile beside this file names the GGUF, the chat template (as Ollama's TEMPLATE), the stop
strings and the system prompt.
"""


def report(exported: Exported) -> str:
    """What the command prints."""
    if not exported.tensors:
        return f"wrote {exported.path} (merged transformers folder)"
    lines = [f"wrote {p}" for p in exported.files]
    lines.append(f"tensors: {summarize(exported.tensors)}")
    fallback = sorted(n for n, t in exported.tensors.items() if t == "f16" and n.endswith(".weight"))
    if fallback and any(t not in ("f16", "f32") for t in exported.tensors.values()):
        lines.append(
            f"kept in f16 (rows do not split into the quant's blocks): {', '.join(fallback[:8])}"
            + (f" and {len(fallback) - 8} more" if len(fallback) > 8 else "")
        )
    if not exported.template_translated:
        lines.append(
            "note: the chat template could not be translated to Ollama's; the Modelfile has no TEMPLATE"
        )
    return "\n".join(lines)
