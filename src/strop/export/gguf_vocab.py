"""A tokenizer described the way llama.cpp reads it: vocabulary, token types, the special ids (BOS, EOS,
end-of-turn, padding), and for each kind what llama.cpp tokenizes with.

- Byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM): llama.cpp's "gpt2" vocabulary, with merges and the
  pre-tokenizer by name. The pre-tokenizer is the part exports most often get wrong (llama.cpp #9309,
  #9927): llama.cpp does not read the split regex from the file, it picks one by the `tokenizer.ggml.pre`
  name. So the name is chosen from the tokenizer's own pre-tokenizer, and one llama.cpp would split
  differently is refused.
- SentencePiece-style BPE (Gemma, Llama 2, Phi-3: byte fallback, '▁' for spaces): llama.cpp's "llama"
  vocabulary. llama.cpp ignores merges there: it joins the adjacent pair whose joined text is the
  best-*scored* token. That equals transformers' BPE when the merges are what SentencePiece implies
  (every split of a token into two tokens is a merge, and a token's merges sit together in rank
  order), as every tokenizer converted from a SentencePiece model has them; the score written is then
  minus the rank of the token's first merge. Merges that do not have that shape (a BPE trained by
  `tokenizers` itself) are refused, as is a space prefix llama.cpp would place differently.
  The merges are written too: transformers' GGUF reader uses them instead of rebuilding them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from strop.core.errors import StropError

# GPT-2's split (tokenizers' ByteLevel with use_regex=True); llama.cpp's "gpt-2".
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"

# llama.cpp token types (llama_token_type / gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
TURN_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")
SPACE = "\u2581"  # SentencePiece's '▁', which stands for a space inside tokens
BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")  # byte fallback's tokens, spelled as llama.cpp looks them up


@dataclass
class Vocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    special: dict[str, int] = field(default_factory=dict)  # bos, eos, eot, pad, unk -> id
    model: str = "gpt2"  # tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (SentencePiece-style)
    scores: list[float] | None = None  # "llama": llama.cpp joins the best-scored pair first
    add_space_prefix: bool | None = None  # "llama": a space before text at the start and after special tokens


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


def space_prefix(normalizer: dict | None, pre_tokenizer: dict | None) -> bool:
    """Whether a SentencePiece-style tokenizer puts '▁' before text as llama.cpp's add_space_prefix does
    (at the start and after every special token: per segment between added tokens), or refuse."""
    replace = {"type": "Replace", "pattern": {"String": " "}, "content": SPACE}
    steps = (normalizer or {}).get("normalizers", []) if (normalizer or {}).get("type") == "Sequence" else []
    gemma_split = {
        "type": "Split",
        "pattern": {"String": " "},
        "behavior": "MergedWithPrevious",
        "invert": False,
    }
    if normalizer == replace and pre_tokenizer in (None, gemma_split):
        return False  # Gemma: spaces become '▁', nothing prepended (the Split finds no space left)
    if steps == [{"type": "Prepend", "prepend": SPACE}, replace] and pre_tokenizer is None:
        return True  # Llama 2 / Phi-3 (legacy): per segment, always, as llama.cpp's add_space_prefix
    meta = pre_tokenizer or {}
    if normalizer is None and meta.get("type") == "Metaspace" and meta.get("replacement") == SPACE:
        scheme = meta.get("prepend_scheme", "always" if meta.get("add_prefix_space", True) else "never")
        if not meta.get("split", True) and scheme == "never":
            return False
        raise StropError(
            f"export: the tokenizer's Metaspace (prepend_scheme {scheme!r}, split {meta.get('split', True)}) "
            "places '▁' where llama.cpp would not (llama.cpp puts one more before every text segment, at the "
            "start and after each special token, even one that starts with a space, and joins across "
            "words); a GGUF file would tokenize differently, so it is not written"
        )
    raise StropError(
        "export: the SentencePiece-style tokenizer turns spaces into '▁' in a way llama.cpp has no setting for "
        f"(normalizer {json.dumps(normalizer)[:120]}, pre-tokenizer {json.dumps(pre_tokenizer)[:120]}); "
        "a GGUF file would tokenize differently, so it is not written"
    )


def merge_scores(vocab: dict[str, int], merges: list[str]) -> dict[str, float]:
    """Each token a merge makes, scored minus the rank of its first merge, after checking that llama.cpp's
    "join the best-scored pair" picks what the merges would: every split of a token into two tokens
    is a merge, and a token's merges are contiguous in rank order. Refuses otherwise."""
    pairs = set()
    scores: dict[str, float] = {}
    last = None
    for rank, merge in enumerate(merges):
        left, right = merge.split(" ")
        pairs.add((left, right))
        token = left + right
        if token != last and token in scores:
            raise StropError(
                f"export: the tokenizer's merges make {token!r} at ranks far apart; llama.cpp's SentencePiece "
                "vocabulary ranks a token once (by its score), so a GGUF file would tokenize differently"
            )
        scores.setdefault(token, -float(rank))
        last = token
    missing = [
        (token[:k], token[k:])
        for token in vocab
        for k in range(1, len(token))
        if token[:k] in vocab and token[k:] in vocab and (token[:k], token[k:]) not in pairs
    ]
    if missing:
        raise StropError(
            f"export: {len(missing)} pairs of tokens join into a token with no merge for them (e.g. "
            f"{missing[0]!r}): llama.cpp's SentencePiece vocabulary joins any such pair, so a GGUF file "
            "would tokenize differently. Tokenizers converted from SentencePiece have these merges; this one "
            "was not made that way"
        )
    return scores


def describe(tokenizer, vocab_size: int, stop_ids: set[int]) -> Vocab:
    """The tokenizer as GGUF metadata, padded to the model's `vocab_size` with unused tokens."""
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    model = state.get("model", {})
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        return _sentencepiece(tokenizer, vocab_size, stop_ids, state)
    # NFC (Qwen 2/2.5/3): llama.cpp does not normalize, so text already in NFC, as most is, tokenizes alike
    if model.get("type") != "BPE" or state.get("normalizer") not in (None, {}, {"type": "NFC"}):
        raise StropError(
            f"export: GGUF export supports byte-level BPE tokenizers (GPT-2, Llama 3, Qwen2, SmolLM style); "
            f"this one is {model.get('type')} with normalizer {state.get('normalizer')}"
        )
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if len(by_id) > vocab_size:
        raise StropError(
            f"export: the tokenizer has {len(by_id)} tokens but the model only {vocab_size} embeddings"
        )
    tokens, types = _tokens(tokenizer, vocab_size, by_id, lambda i, token: NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    special = _special(tokenizer, by_id, stop_ids, types)
    return Vocab(tokens, types, merges, pre_tokenizer_name(state.get("pre_tokenizer")), special)


def _sentencepiece(tokenizer, vocab_size: int, stop_ids: set[int], state: dict) -> Vocab:
    """llama.cpp's "llama" vocabulary for a byte-fallback BPE with '▁' for spaces."""
    model = state["model"]
    if model.get("ignore_merges"):
        raise StropError(
            "export: the tokenizer looks whole words up before merging (ignore_merges), which llama.cpp's "
            "SentencePiece vocabulary does not; a GGUF file would tokenize differently, so it is not written"
        )
    prefix = space_prefix(state.get("normalizer"), state.get("pre_tokenizer"))
    inside = sorted(t.content for t in tokenizer.added_tokens_decoder.values() if t.normalized)
    if prefix and inside:
        raise StropError(
            f"export: added tokens {inside[:3]} are matched after normalizing, so no space prefix follows "
            "them, while llama.cpp prefixes one after every added token; a GGUF file would tokenize "
            "differently, so it is not written"
        )
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if len(by_id) > vocab_size:
        raise StropError(
            f"export: the tokenizer has {len(by_id)} tokens but the model only {vocab_size} embeddings"
        )
    absent = [f"<0x{b:02X}>" for b in range(256) if f"<0x{b:02X}>" not in model["vocab"]]
    if absent:
        raise StropError(
            f"export: the SentencePiece-style tokenizer falls back to bytes but lacks {len(absent)} byte tokens "
            f"(e.g. {absent[0]}); llama.cpp needs all 256 <0x..> tokens, so no GGUF file is written"
        )
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    made = merge_scores(model["vocab"], merges)
    floor = -float(len(merges))  # below every merge: tokens no merge makes (characters, bytes, specials)
    unk = tokenizer.unk_token_id

    def kind(i: int, token: str) -> int:
        return UNKNOWN if i == unk else BYTE if BYTE_TOKEN.fullmatch(token) else NORMAL

    tokens, types = _tokens(tokenizer, vocab_size, by_id, kind)
    scores = [made.get(t, floor) if types[i] == NORMAL else 0.0 for i, t in enumerate(tokens)]
    special = _special(tokenizer, by_id, stop_ids, types)
    return Vocab(tokens, types, merges, "default", special, "llama", scores, prefix)


def _tokens(tokenizer, vocab_size: int, by_id: dict[int, str], kind) -> tuple[list[str], list[int]]:
    """Token texts and types by id; added tokens are control (special) or user-defined, the rest `kind`."""
    added = {i: t for i, t in tokenizer.added_tokens_decoder.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        else:
            tokens.append(by_id[i])
            types.append((CONTROL if added[i].special else USER_DEFINED) if i in added else kind(i, by_id[i]))
    return tokens, types


def _special(tokenizer, by_id: dict[int, str], stop_ids: set[int], types: list[int]) -> dict[str, int]:
    """BOS, EOS, UNK, padding and end-of-turn ids; every stop id becomes a control token (llama.cpp stops on
    control tokens it recognises)."""
    special = {
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "unk": tokenizer.unk_token_id,
        "pad": tokenizer.pad_token_id,
    }
    marked = [i for i in sorted(stop_ids) if by_id.get(i) in TURN_MARKERS]
    special["eot"] = marked[0] if marked else tokenizer.eos_token_id
    for i in stop_ids:
        types[i] = CONTROL
    return {k: v for k, v in special.items() if v is not None}
