"""Labelled rows -> token ids + class index, for sequence classification (`task: classification`).

Rows are `{text, label}` or `{text, text_pair, label}` (field names mappable, any file type strop
reads). Text is tokenized with the tokenizer's own single/pair encoding (`[CLS] a [SEP] b [SEP]` for
BERT-style encoders), never through a chat template, truncated to `max_length` (longest text first).
The label set is the training labels, sorted, unless the config gives an order; it is saved with the
model so predictions map back to names.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from strop.core.config import DataConfig, DatasetSource
from strop.core.data_config import MAX_ROW_BYTES
from strop.core.errors import DataError
from strop.core.io import unreadable_file
from strop.data.build import read_records
from strop.data.formats import Record
from strop.data.leakage import check_leakage
from strop.data.prepare import split_stratified
from strop.data.read import read_rows
from strop.data.tokenized import TokenizedSet

log = logging.getLogger("strop.data")


@dataclass
class LabelledData:
    labels: list[str]
    train: TokenizedSet
    validation: TokenizedSet | None
    records: dict[str, list[Record]]  # train / validation / test, as split
    summary: dict


def build_labelled(cfg: DataConfig, tokenizer, labels: list[str] | None, seed: int) -> LabelledData:
    """Read, split (stratified by label when no validation file is given), check leakage, tokenize."""
    splits = {
        split: [r for src in sources for r in _read(src, cfg.skip_bad_rows, cfg.max_row_bytes)]
        for split, sources in (("train", cfg.train), ("validation", cfg.validation), ("test", cfg.test))
    }
    if not cfg.validation and cfg.val_fraction > 0 and len(splits["train"]) >= 2:
        rng = random.Random(seed)
        side = split_stratified(
            [label_of(r) for r in splits["train"]], [1 - cfg.val_fraction, cfg.val_fraction], rng
        )
        splits["validation"] = [r for r, s in zip(splits["train"], side, strict=True) if s == 1]
        splits["train"] = [r for r, s in zip(splits["train"], side, strict=True) if s == 0]
    leakage = _guard_leakage(cfg, splits)

    names = labels or sorted({label_of(r) for r in splits["train"]})
    if len(names) < 2:
        raise DataError(f"classification needs at least two labels; the training data has {names}")
    for split, recs in splits.items():
        unknown = [r for r in recs if r.label not in names]
        if unknown and (split != "train" or labels):
            shown = ", ".join(f"{r.where} {r.label!r}" for r in unknown[:5])
            raise DataError(
                f"{len(unknown)} {split} row(s) have a label outside {names}: {shown}"
                + ("" if labels else "; every label must occur in the training data")
            )
    index = {name: i for i, name in enumerate(names)}
    train = encode(splits["train"], tokenizer, index, cfg.max_length)
    val = encode(splits["validation"], tokenizer, index, cfg.max_length) if splits["validation"] else None
    counts = Counter(r.label for r in splits["train"])
    summary = {
        "labels": names,
        "train_examples": len(train),
        "validation_examples": len(val) if val is not None else 0,
        "test_examples": len(splits["test"]),
        "train_label_counts": {n: counts.get(n, 0) for n in names},
        "train_tokens": int(sum(len(x) for x in train.ids)),
        "truncated": train.stats["truncated"] + (val.stats["truncated"] if val is not None else 0),
        "leakage": leakage,
    }
    log.info(
        "data: %d train / %d validation examples, labels %s",
        len(train),
        summary["validation_examples"],
        ", ".join(f"{n} {counts.get(n, 0)}" for n in names),
    )
    return LabelledData(names, train, val, splits, summary)


def encode(records: list[Record], tokenizer, index: dict[str, int], max_length: int) -> TokenizedSet:
    """Token ids of each record's text (and pair) with its class index; `trained` is unused (all False)."""
    texts = [texts_of(r)[0] for r in records]
    pairs = [r.pair for r in records]
    has_pairs = any(p is not None for p in pairs)
    if has_pairs and not all(p is not None for p in pairs):
        missing = next(r for r in records if r.pair is None)
        raise DataError(f"{missing.where}: text_pair: missing (other rows of this data have one)")
    full = tokenizer(texts, pairs if has_pairs else None, truncation=False)["input_ids"]
    enc = tokenizer(texts, pairs if has_pairs else None, truncation=True, max_length=max_length)
    ids = [np.asarray(x, dtype=np.int32) for x in enc["input_ids"]]
    truncated = [r.id for r, a, b in zip(records, full, ids, strict=True) if len(a) > len(b)]
    return TokenizedSet(
        ids,
        [np.zeros(len(x), dtype=bool) for x in ids],
        [r.id for r in records],
        {"truncated": len(truncated), "truncated_ids": truncated[:20]},
        [index[label_of(r)] for r in records],
    )


def read_texts(path: Path) -> list[tuple[str, str | None]]:
    """Texts to classify: a .txt file (one per line) or rows with `text` (and `text_pair`)."""
    if path.suffix == ".txt":
        why = unreadable_file(path)
        if why:
            raise DataError(f"{path}: {why}")
        return [(line, None) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    out = []
    for row in read_rows(str(path)):
        text, pair = row.data.get("text"), row.data.get("text_pair")
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{row.where}: text: expected a non-empty string")
        if pair is not None and not isinstance(pair, str):
            raise DataError(f"{row.where}: text_pair: expected a string")
        out.append((text, pair))
    if len({p is None for _, p in out}) > 1:
        raise DataError(f"{path}: some rows have a text_pair and some do not")
    return out


def class_weights(targets: list[int], labels: list[str], spec) -> list[float] | None:
    """Per-class loss weights: `balanced` = n / (classes x count) (sklearn's rule), or as given by label."""
    if spec == "none":
        return None
    if spec == "balanced":
        counts = np.bincount(targets, minlength=len(labels))
        return [len(targets) / (len(labels) * c) if c else 0.0 for c in counts]
    unknown = sorted(set(spec) - set(labels))
    if unknown:
        raise DataError(f"classify.class_weights: unknown label(s) {unknown}; labels are {labels}")
    return [float(spec.get(name, 1.0)) for name in labels]


def texts_of(r: Record) -> tuple[str, str | None]:
    """(text, text_pair) of a labelled record."""
    assert r.messages is not None  # formats._labelled: (user prompt, assistant label)
    prompt = r.messages[0]["content"]
    return (prompt, None) if r.pair is None else (prompt[: -len(r.pair) - 2], r.pair)  # formats.py: "a\n\nb"


def label_of(r: Record) -> str:
    assert r.label is not None, r.where  # formats._labelled always sets one
    return r.label


def _read(src: DatasetSource, skip_bad_rows: bool, max_row_bytes: int = MAX_ROW_BYTES) -> list[Record]:
    if src.format == "auto":
        src = src.model_copy(update={"format": "labelled"})
    if src.format != "labelled":
        raise DataError(
            f"{src.path}: format {src.format}: classification reads labelled rows (text, label); "
            "map your columns with fields: {text: ..., label: ...}"
        )
    return read_records(src, [] if skip_bad_rows else None, max_row_bytes)  # as SFT does


def _guard_leakage(cfg: DataConfig, splits: dict[str, list[Record]]) -> dict:
    """Copies of training rows are taken out of a held-out split strop made, and stop the run when in
    files the user gave (unless data.allow_leakage), as for SFT (data/build.py)."""
    found = check_leakage(splits)
    for split, given in (("validation", bool(cfg.validation)), ("test", bool(cfg.test))):
        ids = set(found.get(f"train_{split}", {}).get("ids", []))
        if not ids:
            continue
        if not given:
            splits[split] = [r for r in splits[split] if r.id not in ids]
        elif not cfg.allow_leakage:
            raise DataError(
                f"data.{split}: {len(ids)} example(s) duplicate or nearly duplicate training rows: "
                f"{', '.join(sorted(ids)[:10])}; remove them (strop data prepare) or set data.allow_leakage: true"
            )
    return found
