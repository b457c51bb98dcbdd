"""Tokenize records once and cache the arrays on disk (safetensors + JSON, never pickle).

The cache key covers the data bytes, the tokenizer, the template, the maximum length and the masking
rule, so a change to any of them re-tokenizes and nothing stale is ever reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file
from tqdm.auto import tqdm

from strop.core.errors import DataError
from strop.core.io import atomic_dir, cache_root
from strop.data.formats import Record
from strop.data.template import ChatTemplate, encode_text

log = logging.getLogger("strop.data")

CACHE_VERSION = "2"  # 2: stats name truncated/dropped examples and rejected rows


@dataclass
class TokenizedSet:
    """Examples as int32 token arrays and bool loss masks, plus per-example ids and drop counts."""

    ids: list[np.ndarray]
    trained: list[np.ndarray]
    example_ids: list[str]
    stats: dict = field(default_factory=dict)
    targets: list[int] | None = None  # classification: the class index of each example
    rejected: TokenizedSet | None = None  # preference pairs: row i's rejected side (rows are the chosen)
    reference: np.ndarray | None = None  # (n, 2) reference log-probs of chosen and rejected (DPO)
    teacher: list[tuple[np.ndarray, np.ndarray]] | None = (
        None  # per example: top-k (logits, ids), (labels, k)
    )
    ratings: np.ndarray | None = None  # (n,) float32 scores of each reply (reward models on ratings)
    margins: np.ndarray | None = None  # (n,) float32 preference margins of pairs (reward models)

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, index: list[int]) -> TokenizedSet:
        return TokenizedSet(
            [self.ids[i] for i in index],
            [self.trained[i] for i in index],
            [self.example_ids[i] for i in index],
            dict(self.stats),
            None if self.targets is None else [self.targets[i] for i in index],
            None if self.rejected is None else self.rejected.subset(index),
            None if self.reference is None else self.reference[list(index)],
            None if self.teacher is None else [self.teacher[i] for i in index],
            None if self.ratings is None else self.ratings[list(index)],
            None if self.margins is None else self.margins[list(index)],
        )

    @staticmethod
    def concat(parts: list[TokenizedSet]) -> TokenizedSet:
        out = TokenizedSet(
            [], [], [], {}, [] if parts and all(p.targets is not None for p in parts) else None
        )
        if parts and all(p.rejected is not None for p in parts):
            out.rejected = TokenizedSet.concat([p.rejected for p in parts if p.rejected is not None])
        if parts and all(p.teacher is not None for p in parts):
            out.teacher = [t for p in parts if p.teacher is not None for t in p.teacher]
        if parts and all(p.ratings is not None for p in parts):
            out.ratings = np.concatenate([p.ratings for p in parts])
        if parts and all(p.reference is not None for p in parts):
            out.reference = np.concatenate([p.reference for p in parts])
        if parts and any(p.margins is not None for p in parts):  # pairs without a margin have 0
            out.margins = np.concatenate(
                [p.margins if p.margins is not None else np.zeros(len(p), np.float32) for p in parts]
            )
        for p in parts:
            if out.targets is not None:
                assert p.targets is not None  # out has targets only when every part has them
                out.targets += p.targets
            out.ids += p.ids
            out.trained += p.trained
            out.example_ids += p.example_ids
            for k, v in p.stats.items():
                if type(v) is int or isinstance(v, list):  # counts add, lists of ids join; bools do not
                    out.stats[k] = out.stats.get(k, type(v)()) + v
                elif isinstance(v, dict):  # counts by label
                    merged = dict(out.stats.get(k, {}))
                    for label, n in v.items():
                        merged[label] = merged.get(label, 0) + n
                    out.stats[k] = merged
                else:
                    out.stats[k] = v
        return out

    def label_tokens(self) -> int:
        return int(sum(m[1:].sum() for m in self.trained))


# Below this many records one process is quicker than starting workers.
PARALLEL_MIN_RECORDS = 2000
CHUNK_RECORDS = 2048  # records per worker task: the bar moves and each result is a small pickle


def tokenize_records(
    records: list[Record],
    template: ChatTemplate,
    max_length: int,
    train_on_prompt: bool,
    workers: int | None = None,
    progress: bool | None = None,
) -> TokenizedSet:
    """Encode, truncate to `max_length`, and drop examples whose response was cut away entirely.

    Large inputs are split into contiguous chunks tokenized by `workers` processes (default: one per
    CPU); chunks are concatenated in order, so the result equals the serial one exactly. A conversation
    is tokenized only as far as `max_length` needs (`ChatTemplate.encode(max_tokens=...)`), so time and
    memory grow with the tokens kept, whatever the size of a row.

    `progress`: a bar on stderr; None shows it on a terminal unless strop logs below INFO (`-q`).
    """
    workers = workers or os.cpu_count() or 1
    fork = "fork" in multiprocessing.get_all_start_methods()  # a compiled template does not pickle
    disable = (None if log.isEnabledFor(logging.INFO) else True) if progress is None else not progress
    with tqdm(total=len(records), desc="tokenize", unit="ex", disable=disable, leave=False) as bar:
        if not (fork and workers > 1 and len(records) >= PARALLEL_MIN_RECORDS):
            return _tokenize_serial(records, template, max_length, train_on_prompt, bar)
        size = min(CHUNK_RECORDS, -(-len(records) // (workers * 4)))  # several chunks per worker
        chunks = [records[i : i + size] for i in range(0, len(records), size)]
        parts = []
        # forked workers inherit the template and tokenizer (initargs are not pickled under fork)
        with ProcessPoolExecutor(
            workers,
            mp_context=multiprocessing.get_context("fork"),
            initializer=_worker_init,
            initargs=(template, max_length, train_on_prompt),
        ) as pool:
            for part in pool.map(_tokenize_chunk, chunks):
                parts.append(part)
                bar.update(part.stats["examples_in"])
        return TokenizedSet.concat(parts)


_worker_args: tuple = ()


def _worker_init(template: ChatTemplate, max_length: int, train_on_prompt: bool) -> None:
    global _worker_args
    _worker_args = (template, max_length, train_on_prompt)


def _tokenize_chunk(records: list[Record]) -> TokenizedSet:
    return _tokenize_serial(records, *_worker_args)


def _tokenize_serial(
    records: list[Record], template: ChatTemplate, max_length: int, train_on_prompt: bool, bar=None
) -> TokenizedSet:
    out = TokenizedSet(
        [],
        [],
        [],
        {
            "examples_in": len(records),
            "truncated": 0,
            "dropped_no_response": 0,
            "truncated_ids": [],
            "dropped_ids": [],
        },
    )
    for k, rec in enumerate(records, start=1):
        if bar is not None and k % 256 == 0:
            bar.update(256)
        if rec.text is not None:
            for j, window in enumerate(encode_text(template.tokenizer, rec.text, max_length)):
                out.ids.append(np.asarray(window, dtype=np.int32))
                out.trained.append(np.ones(len(window), dtype=bool))
                out.example_ids.append(rec.id if j == 0 else f"{rec.id}#{j}")
            continue
        assert rec.messages is not None  # a record has text or messages
        try:
            # tokens past max_length + 1 are never computed: a 50 MB turn costs what a long one does
            enc = template.encode(rec.messages, train_on_prompt=train_on_prompt, max_tokens=max_length)
        except DataError as e:
            raise DataError(f"{rec.where or rec.id}: {e}") from None
        ids, trained = enc.ids, enc.trained
        if len(ids) > max_length:
            out.stats["truncated"] += 1
            out.stats["truncated_ids"].append(rec.id)
            ids, trained = ids[:max_length], trained[:max_length]
        # the first token is never predicted, so a loss needs a trained token after position 0
        if not any(trained[1:]):
            out.stats["dropped_no_response"] += 1
            out.stats["dropped_ids"].append(rec.id)
            continue
        out.ids.append(np.asarray(ids, dtype=np.int32))
        out.trained.append(np.asarray(trained, dtype=bool))
        out.example_ids.append(rec.id)
    return out


def cache_key(parts: dict, files: list[Path]) -> str:
    h = hashlib.sha256(json.dumps({**parts, "v": CACHE_VERSION}, sort_keys=True).encode())
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:24]


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = json.dumps([tokenizer.eos_token, tokenizer.bos_token, tokenizer.pad_token])
    return hashlib.sha256((text + extra).encode()).hexdigest()[:16]


def default_cache_dir() -> Path:
    return cache_root() / "tokenized"


def save_cached(path: Path, ts: TokenizedSet) -> None:
    lengths = np.asarray([len(x) for x in ts.ids], dtype=np.int64)
    flat_ids = np.concatenate(ts.ids) if ts.ids else np.zeros(0, np.int32)
    flat_mask = np.concatenate(ts.trained).astype(np.uint8) if ts.trained else np.zeros(0, np.uint8)

    def fill(tmp: Path) -> None:
        save_file(
            {"ids": flat_ids, "trained": flat_mask, "lengths": lengths}, str(tmp / "tokens.safetensors")
        )
        (tmp / "meta.json").write_text(json.dumps({"example_ids": ts.example_ids, "stats": ts.stats}))

    atomic_dir(path, fill)


def load_cached(path: Path) -> TokenizedSet | None:
    if not (path / "meta.json").is_file():
        return None
    arrays = load_file(str(path / "tokens.safetensors"))
    meta = json.loads((path / "meta.json").read_text())
    bounds = np.cumsum(arrays["lengths"])[:-1]
    ids = np.split(arrays["ids"], bounds) if len(arrays["lengths"]) else []
    trained = np.split(arrays["trained"].astype(bool), bounds) if len(arrays["lengths"]) else []
    return TokenizedSet(list(ids), list(trained), meta["example_ids"], meta["stats"])
