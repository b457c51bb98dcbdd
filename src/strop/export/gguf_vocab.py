"""A byte-level BPE tokenizer described the way llama.cpp reads it: vocabulary, merges, token types, the
pre-tokenizer by the name llama.cpp knows, and the special ids (BOS, EOS, end-of-turn, padding).

The pre-tokenizer is the part exports most often get wrong (llama.cpp #9309, #9927): llama.cpp does
not read the split regex from the file, it picks one by the `tokenizer.ggml.pre` name. So the name is
chosen from the tokenizer's own pre-tokenizer, and one llama.cpp would split differently is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from strop.core.errors import StropError

# GPT-2's split (tokenizers' ByteLevel with use_regex=True); llama.cpp's "gpt-2".
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"

# llama.cpp token types (llama_token_type / gguf.TokenType)
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5
TURN_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


@dataclass
class Vocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    special: dict[str, int] = field(default_factory=dict)  # bos, eos, eot, pad, unk -> id


def pre_tokenizer_name(spec: dict | None) -> str:
    """The llama.cpp name of a tokenizers pre-tokenizer (tokenizer.json's `pre_tokenizer`), or refuse."""
    spec = spec or {}
    parts: list[dict] = spec.get("pretokenizers", []) if spec.get("type") == "Sequence" else [spec]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if (
        kinds == ["Digits", "ByteLevel"]
        and parts[0].get("individual_digits")
        and parts[1].get("use_regex", True)
    ):
        return "smollm"  # each digit alone, then GPT-2's split (llama.cpp's LLAMA_VOCAB_PRE_TYPE_SMOLLM)
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        regex = (parts[0].get("pattern") or {}).get("Regex")
        known = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2", GPT2_SPLIT: "gpt-2"}
        if regex in known:
            return known[regex]
    raise StropError(
        f"export: the tokenizer splits text with a pre-tokenizer llama.cpp has no name for ({json.dumps(spec)[:200]}); "
        "a GGUF file would tokenize differently from training, so it is not written"
    )


def describe(tokenizer, vocab_size: int, stop_ids: set[int]) -> Vocab:
    """The tokenizer as GGUF metadata, padded to the model's `vocab_size` with unused tokens."""
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    model = state.get("model", {})
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        raise StropError(
            "export: the tokenizer is SentencePiece-style (byte-fallback BPE with '▁' for spaces, as Gemma, "
            "Phi-3 and Mistral v0.1-v0.3 use); llama.cpp reads it as its 'llama' vocabulary with scores, "
            "which strop does not write yet"
        )
    if model.get("type") != "BPE" or state.get("normalizer") not in (None, {}):
        raise StropError(
            f"export: GGUF export supports byte-level BPE tokenizers (GPT-2, Llama 3, Qwen2, SmolLM style); "
            f"this one is {model.get('type')} with normalizer {state.get('normalizer')}"
        )
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if len(by_id) > vocab_size:
        raise StropError(
            f"export: the tokenizer has {len(by_id)} tokens but the model only {vocab_size} embeddings"
        )
    added = {i: t for i, t in tokenizer.added_tokens_decoder.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        else:
            tokens.append(by_id[i])
            types.append((CONTROL if added[i].special else USER_DEFINED) if i in added else NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    special = {
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "unk": tokenizer.unk_token_id,
        "pad": tokenizer.pad_token_id,
    }
    marked = [i for i in sorted(stop_ids) if by_id.get(i) in TURN_MARKERS]
    special["eot"] = marked[0] if marked else tokenizer.eos_token_id
    for i in stop_ids:  # llama.cpp stops on control tokens it recognises; make sure each stop id is one
        types[i] = CONTROL
    return Vocab(
        tokens,
        types,
        merges,
        pre_tokenizer_name(state.get("pre_tokenizer")),
        {k: v for k, v in special.items() if v is not None},
    )
