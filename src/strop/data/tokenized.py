"""Tokenize records once and cache the arrays on disk (safetensors + JSON, never pickle).

The cache key covers the data bytes, the tokenizer, the template, the maximum length and the masking
rule, so a change to any of them re-tokenizes and nothing stale is ever reused.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import multiprocessing
import operator
import os
from collections import deque
from collections.abc import Iterable, Iterator, Sequence, Sized
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import overload

import numpy as np
from safetensors.numpy import load_file, save_file

from strop.core.errors import DataError
from strop.core.io import atomic_dir, cache_root
from strop.core.progress import tqdm
from strop.data.formats import Record
from strop.data.template import ChatTemplate, encode_text

log = logging.getLogger("strop.data")

CACHE_VERSION = "2"  # 2: stats name truncated/dropped examples and rejected rows


TAKE_BLOCK = 256  # rows gathered at once by Ragged.take: bounds its int64 index arrays


class Ragged(Sequence[np.ndarray]):
    """Rows of different lengths in one flat array: row i is `flat[offsets[i]:offsets[i + 1]]`, a view.

    A million short examples cost their tokens plus 8 bytes each, not two numpy objects (~110 bytes
    each) per example as a list of arrays would.
    """

    def __init__(self, flat: np.ndarray, offsets: np.ndarray):
        self.flat, self.offsets = flat, offsets  # (total,), (n + 1,) int64 starting at 0

    @staticmethod
    def from_rows(rows: Iterable, dtype) -> Ragged:
        if isinstance(rows, Ragged):
            return rows if rows.flat.dtype == dtype else Ragged(rows.flat.astype(dtype), rows.offsets)
        arrays = [np.asarray(r, dtype=dtype) for r in rows]
        offsets = np.zeros(len(arrays) + 1, np.int64)
        np.cumsum([len(a) for a in arrays], out=offsets[1:])
        return Ragged(np.concatenate(arrays) if arrays else np.zeros(0, dtype), offsets)

    @staticmethod
    def concat(parts: Sequence[Ragged], dtype) -> Ragged:
        if not parts:
            return Ragged(np.zeros(0, dtype), np.zeros(1, np.int64))
        starts = np.cumsum([0] + [len(p.flat) for p in parts[:-1]])
        offsets = np.concatenate(
            [np.zeros(1, np.int64)] + [p.offsets[1:] + s for p, s in zip(parts, starts, strict=True)]
        )
        return Ragged(np.concatenate([p.flat for p in parts]).astype(dtype, copy=False), offsets)

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def take(self, index: Sequence[int] | np.ndarray) -> Ragged:
        """The rows at `index`, in that order (repeats allowed), as a new Ragged."""
        index = np.asarray(index, dtype=np.int64).reshape(-1)
        starts, lengths = self.offsets[index], self.lengths()[index]
        offsets = np.zeros(len(index) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        out = np.empty(int(offsets[-1]), self.flat.dtype)
        for lo in range(0, len(index), TAKE_BLOCK):  # int64 positions for a block of rows at a time
            hi = min(lo + TAKE_BLOCK, len(index))
            # position j of the output reads flat[starts[row] + (j - offsets[row])]
            shift = np.repeat(starts[lo:hi] - offsets[lo:hi], lengths[lo:hi])
            out[offsets[lo] : offsets[hi]] = self.flat[shift + np.arange(offsets[lo], offsets[hi])]
        return Ragged(out, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @overload
    def __getitem__(self, i: int) -> np.ndarray: ...
    @overload
    def __getitem__(self, i: slice) -> list[np.ndarray]: ...
    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        i = operator.index(i)
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"row {i} of {n}")
        i %= n
        return self.flat[self.offsets[i] : self.offsets[i + 1]]

    def __iter__(self) -> Iterator[np.ndarray]:
        bounds = self.offsets.tolist()
        return (self.flat[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True))


@dataclass
class TokenizedSet:
    """Examples as int32 token arrays and bool loss masks, plus per-example ids and drop counts.

    `ids` and `trained` may be given as any sequences of rows; they are held as `Ragged` (one flat
    array each), so `ts.ids[i]` is a view and the set costs its tokens, not an object per example.
    """

    ids: Sequence[np.ndarray]
    trained: Sequence[np.ndarray]
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

    def __post_init__(self) -> None:
        self.ids = Ragged.from_rows(self.ids, np.int32)
        self.trained = Ragged.from_rows(self.trained, np.bool_)

    @property
    def ragged_ids(self) -> Ragged:
        assert isinstance(self.ids, Ragged)  # __post_init__ made it one
        return self.ids

    @property
    def ragged_trained(self) -> Ragged:
        assert isinstance(self.trained, Ragged)  # __post_init__ made it one
        return self.trained

    def lengths(self) -> np.ndarray:
        """(n,) int64 tokens per example."""
        return self.ragged_ids.lengths()

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, index: Sequence[int] | np.ndarray) -> TokenizedSet:
        return TokenizedSet(
            self.ragged_ids.take(index),
            self.ragged_trained.take(index),
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
            Ragged.concat([p.ragged_ids for p in parts], np.int32),
            Ragged.concat([p.ragged_trained for p in parts], np.bool_),
            [],
            {},
            [] if parts and all(p.targets is not None for p in parts) else None,
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
        """Trained tokens after each example's first (the first token is never predicted)."""
        m = self.ragged_trained
        firsts = m.offsets[:-1][m.lengths() > 0]
        return int(m.flat.sum() - m.flat[firsts].sum())


# Below this many records one process is quicker than starting workers.
PARALLEL_MIN_RECORDS = 2000
CHUNK_RECORDS = 2048  # records per chunk (and worker task): bounds what is alive besides the tokens


def tokenize_records(
    records: Iterable[Record],
    template: ChatTemplate,
    max_length: int,
    train_on_prompt: bool,
    workers: int | None = None,
    progress: bool | None = None,
) -> TokenizedSet:
    """Encode, truncate to `max_length`, and drop examples whose response was cut away entirely.

    `records` may be a stream (e.g. `strop.data.build.stream_records`): they are taken
    `CHUNK_RECORDS` at a time, each chunk's tokens kept as flat int32/bool arrays and the chunk's
    records let go, so memory holds the tokens and ids, never all records. Large inputs are tokenized
    by `workers` processes (default: one per CPU), a few chunks in flight; chunks are joined in
    order, so the result equals the serial one exactly. A conversation is tokenized only as far as
    `max_length` needs (`ChatTemplate.encode(max_tokens=...)`), so time and memory grow with the
    tokens kept, whatever the size of a row.

    `progress`: a bar on stderr; None shows it on a terminal unless strop logs below INFO (`-q`).
    """
    workers = workers or os.cpu_count() or 1
    total = len(records) if isinstance(records, Sized) else None
    stream = iter(records)
    fork = "fork" in multiprocessing.get_all_start_methods()  # a compiled template does not pickle
    # enough records to be worth the workers? (a list or a stream: the first ones say)
    head = list(itertools.islice(stream, PARALLEL_MIN_RECORDS)) if fork and workers > 1 else []
    parallel = len(head) >= PARALLEL_MIN_RECORDS
    size = CHUNK_RECORDS
    if parallel and total is not None:
        size = min(CHUNK_RECORDS, -(-total // (workers * 4)))  # several chunks per worker
    chunks = _chunks(itertools.chain(head, stream), size)
    disable = (None if log.isEnabledFor(logging.INFO) else True) if progress is None else not progress
    parts: list[TokenizedSet] = []
    with tqdm(total=total, desc="tokenize", unit="ex", disable=disable, leave=False) as bar:
        if not parallel:
            for chunk in chunks:
                parts.append(_tokenize_serial(chunk, template, max_length, train_on_prompt, bar))
                bar.update(len(chunk) % 256)
            return (
                TokenizedSet.concat(parts)
                if parts
                else _tokenize_serial([], template, max_length, train_on_prompt)
            )
        # forked workers inherit the template and tokenizer (initargs are not pickled under fork)
        with ProcessPoolExecutor(
            workers,
            mp_context=multiprocessing.get_context("fork"),
            initializer=_worker_init,
            initargs=(template, max_length, train_on_prompt),
        ) as pool:
            pending: deque[tuple[Future, list[Record]]] = deque()

            def finish() -> None:
                future, chunk = pending.popleft()
                part = _shared_ids(future.result(), chunk)
                parts.append(part)
                bar.update(part.stats["examples_in"])

            for chunk in chunks:
                pending.append((pool.submit(_tokenize_chunk, chunk), chunk))
                if len(pending) >= 2 * workers:  # read ahead no further: records wait in memory
                    finish()
            while pending:
                finish()
        return TokenizedSet.concat(parts)


def _chunks(records: Iterator[Record], size: int) -> Iterator[list[Record]]:
    while chunk := list(itertools.islice(records, size)):
        yield chunk


def _shared_ids(part: TokenizedSet, chunk: list[Record]) -> TokenizedSet:
    """A worker's example ids replaced by the records' own strings (one copy of each id, not two)."""
    own = {r.id: r.id for r in chunk}
    part.example_ids = [own.get(e, e) for e in part.example_ids]
    return part


_worker_args: tuple = ()


def _worker_init(template: ChatTemplate, max_length: int, train_on_prompt: bool) -> None:
    global _worker_args
    _worker_args = (template, max_length, train_on_prompt)


def _tokenize_chunk(records: list[Record]) -> TokenizedSet:
    return _tokenize_serial(records, *_worker_args)


def _tokenize_serial(
    records: list[Record], template: ChatTemplate, max_length: int, train_on_prompt: bool, bar=None
) -> TokenizedSet:
    ids: list[np.ndarray] = []
    trained: list[np.ndarray] = []
    example_ids: list[str] = []
    stats: dict = {
        "examples_in": len(records),
        "truncated": 0,
        "dropped_no_response": 0,
        "truncated_ids": [],
        "dropped_ids": [],
    }
    for k, rec in enumerate(records, start=1):
        if bar is not None and k % 256 == 0:
            bar.update(256)
        if rec.text is not None:
            for j, window in enumerate(encode_text(template.tokenizer, rec.text, max_length)):
                ids.append(np.asarray(window, dtype=np.int32))
                trained.append(np.ones(len(window), dtype=bool))
                example_ids.append(rec.id if j == 0 else f"{rec.id}#{j}")
            continue
        assert rec.messages is not None  # a record has text or messages
        try:
            # tokens past max_length + 1 are never computed: a 50 MB turn costs what a long one does
            enc = template.encode(rec.messages, train_on_prompt=train_on_prompt, max_tokens=max_length)
        except DataError as e:
            raise DataError(f"{rec.where or rec.id}: {e}") from None
        row, mask = enc.ids, enc.trained
        if len(row) > max_length:
            stats["truncated"] += 1
            stats["truncated_ids"].append(rec.id)
            row, mask = row[:max_length], mask[:max_length]
        # the first token is never predicted, so a loss needs a trained token after position 0
        if not any(mask[1:]):
            stats["dropped_no_response"] += 1
            stats["dropped_ids"].append(rec.id)
            continue
        ids.append(np.asarray(row, dtype=np.int32))
        trained.append(np.asarray(mask, dtype=bool))
        example_ids.append(rec.id)
    return TokenizedSet(ids, trained, example_ids, stats)  # one flat array each: the chunk's tokens


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
    lengths = ts.lengths()
    flat_ids = ts.ragged_ids.flat
    flat_mask = ts.ragged_trained.flat.astype(np.uint8)

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
    offsets = np.zeros(len(arrays["lengths"]) + 1, np.int64)
    np.cumsum(arrays["lengths"], out=offsets[1:])
    ids = Ragged(arrays["ids"].astype(np.int32, copy=False), offsets)
    trained = Ragged(arrays["trained"].astype(bool), offsets)
    return TokenizedSet(ids, trained, meta["example_ids"], meta["stats"])
