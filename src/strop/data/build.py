"""DataConfig -> tokenized train and validation sets, with a summary of what was read and dropped."""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from strop.core.config import DataConfig, DatasetSource
from strop.core.errors import DataError
from strop.data.duplicates import find_duplicates
from strop.data.formats import Record, to_records
from strop.data.read import SUFFIXES, read_rows
from strop.data.template import ChatTemplate
from strop.data.tokenized import (
    TokenizedSet,
    cache_key,
    default_cache_dir,
    load_cached,
    save_cached,
    tokenize_records,
    tokenizer_fingerprint,
)

log = logging.getLogger("strop.data")


@dataclass
class Datasets:
    train: TokenizedSet
    validation: TokenizedSet | None
    summary: dict


def build_datasets(cfg: DataConfig, template: ChatTemplate, seed: int) -> Datasets:
    sources: list[dict] = []
    train = TokenizedSet.concat([_load_source(s, cfg, template, sources, "train") for s in cfg.train])
    if cfg.validation:
        val = TokenizedSet.concat(
            [_load_source(s, cfg, template, sources, "validation") for s in cfg.validation]
        )
    elif cfg.val_fraction > 0 and len(train) >= 2:
        val_index = _held_out(train.example_ids, cfg.val_fraction, seed)
        train_index = sorted(set(range(len(train))) - set(val_index))
        val, train = train.subset(val_index), train.subset(train_index)
    else:
        val = None
    removed = 0
    if val is not None:
        seen = {x.tobytes() for x in train.ids}
        keep = [i for i, x in enumerate(val.ids) if x.tobytes() not in seen]
        removed = len(val) - len(keep)
        val = val.subset(keep) if keep else None
    if len(train) == 0:
        raise DataError(
            "no training examples left after tokenization (all responses truncated away?); "
            "raise data.max_length"
        )
    summary = {
        "sources": sources,
        "train_examples": len(train),
        "validation_examples": len(val) if val is not None else 0,
        "validation_duplicates_of_train_removed": removed,
        "train_label_tokens": train.label_tokens(),
        "train_tokens": int(sum(len(x) for x in train.ids)),
        **length_summary(train, val, cfg.max_length),
    }
    if removed:
        log.warning("removed %d validation example(s) that duplicate training examples", removed)
    return Datasets(train, val, summary)


LEAK_CHECK_MAX_EXAMPLES = 50_000  # MinHash over more takes minutes in Python: left to a data check


def split_records(cfg: DataConfig, data: Datasets) -> dict[str, list[Record]]:
    """The records behind each split (train and validation as built, test as given), read once for
    the checks and the evaluation that need text rather than tokens."""
    train_ids = set(data.train.example_ids)
    val_ids = set(data.validation.example_ids) if data.validation is not None else set()
    train_records = [r for s in cfg.train for r in read_records(s)]
    pool = [r for s in cfg.validation for r in read_records(s)] if cfg.validation else train_records
    return {
        "train": [r for r in train_records if r.id in train_ids],
        "validation": [r for r in pool if r.id in val_ids],
        "test": [r for s in cfg.test for r in read_records(s)],
    }


def check_leakage(splits: dict[str, list[Record]]) -> dict:
    """Exact and near duplicates between the training examples and the validation and test sets:
    logged as warnings with example ids and returned for the data summary."""
    if not splits["validation"] and not splits["test"]:
        return {"checked": False}
    total = sum(map(len, splits.values()))
    if total > LEAK_CHECK_MAX_EXAMPLES:
        log.info(
            "data: %d examples: near-duplicate leakage check skipped (over %d)",
            total,
            LEAK_CHECK_MAX_EXAMPLES,
        )
        return {"checked": False}
    dups = find_duplicates(splits)
    out: dict = {"checked": True}
    for other in ("validation", "test"):
        if not splits[other]:
            continue
        pairs = dups.leaks("train", other)
        out[f"train_{other}"] = {
            "exact": sum(kind == "exact" for *_, kind in pairs),
            "near": sum(kind == "near" for *_, kind in pairs),
            "pairs": [[b.id, a.id, kind] for a, b, kind in pairs[:20]],
        }
        if pairs:
            shown = ", ".join(f"{b.id} ~ {a.id} ({kind})" for a, b, kind in pairs[:5])
            log.warning(
                "data: leakage: %d %s example(s) duplicate or nearly duplicate training examples: %s%s",
                len({b for _, b, _ in pairs}),
                other,
                shown,
                " ..." if len(pairs) > 5 else "",
            )
    return out


def length_summary(train: TokenizedSet, val: TokenizedSet | None, max_length: int) -> dict:
    """Token-length histogram (16 bins up to max_length) and percentiles per split, for the report."""
    edges = np.linspace(0, max_length, 17).round().astype(int)
    hist, pct = {"edges": edges.tolist()}, {}
    for name, ts in (("train", train), ("validation", val)):
        if ts is None or len(ts) == 0:
            continue
        lengths = np.array([len(x) for x in ts.ids])
        hist[name] = np.histogram(lengths, bins=edges)[0].tolist()
        p50, p90 = np.percentile(lengths, [50, 90])
        pct[name] = {"p50": float(p50), "p90": float(p90), "max": int(lengths.max())}
    return {"length_histogram": hist, "length_percentiles": pct}


def read_records(src: DatasetSource) -> list[Record]:
    """A source's rows as records (no tokenization), e.g. for generation-based evaluation."""
    return to_records(source_rows(src), src.format, src.fields, src.path)[0]


def source_rows(src: DatasetSource) -> list:
    """The rows a source selects: `skip` rows left out, then at most `limit`."""
    rows = read_rows(src.path, split=src.split, limit=src.limit + src.skip if src.limit else None)
    if src.skip and len(rows) <= src.skip:
        raise DataError(f"{src.path}: skip {src.skip} leaves no rows (the source has {len(rows)})")
    return rows[src.skip :]


def _held_out(example_ids: list[str], fraction: float, seed: int) -> list[int]:
    """A seeded random fraction of examples, whole documents at a time: the windows of one long text
    ("id", "id#1", ...) stay on one side, so validation never sees text it trained on."""
    groups: dict[str, list[int]] = {}
    for i, eid in enumerate(example_ids):
        groups.setdefault(eid.split("#", 1)[0], []).append(i)
    keys = list(groups)
    random.Random(seed).shuffle(keys)
    target, picked = max(1, round(len(example_ids) * fraction)), []
    for k in keys:
        if len(picked) >= target or len(picked) + len(groups[k]) >= len(example_ids):
            break
        picked += groups[k]
    return sorted(picked)


def _load_source(
    src: DatasetSource, cfg: DataConfig, template: ChatTemplate, report: list, split: str
) -> TokenizedSet:
    path = Path(src.path).expanduser()
    files = sorted(f for f in path.iterdir() if f.suffix in SUFFIXES) if path.is_dir() else [path]
    local = all(f.is_file() for f in files)
    key_parts = {
        "path": str(path.resolve()) if local else src.path,
        "format": src.format,
        "fields": src.fields,
        "split": src.split,
        "limit": src.limit,
        "skip": src.skip,
        "tokenizer": tokenizer_fingerprint(template.tokenizer),
        "template": template.source,
        "system": template.system_prompt,
        "max_length": cfg.max_length,
        "train_on_prompt": cfg.train_on_prompt,
    }
    cache = None
    if local:
        cache = Path(cfg.cache_dir or default_cache_dir()) / cache_key(key_parts, files)
        cached = load_cached(cache)
        if cached is not None:
            log.info("data: %s: %d tokenized examples from the cache %s", src.path, len(cached), cache)
            report.append({"path": src.path, "split": split, **cached.stats, "cached": True})
            return cached
    rows = source_rows(src)
    records, fmt = to_records(rows, src.format, src.fields, src.path)
    how = "given" if src.format != "auto" else "detected"
    log.info("data: %s: %d rows, format %s (%s)", src.path, len(rows), fmt, how)
    t0 = time.perf_counter()
    ts = tokenize_records(records, template, cfg.max_length, cfg.train_on_prompt)
    seconds = time.perf_counter() - t0
    n_tokens = sum(len(x) for x in ts.ids)
    log.info(
        "data: %s: tokenized %d examples (%d tokens) in %.1f s: %.0f tokens/s",
        src.path,
        len(ts),
        n_tokens,
        seconds,
        n_tokens / max(seconds, 1e-9),
    )
    ts.stats.update({"rows": len(rows), "format": fmt, "format_detected": how == "detected"})
    if ts.stats["dropped_no_response"]:
        log.warning(
            "data: %s: dropped %d example(s) whose response was truncated away (max_length %d)",
            src.path,
            ts.stats["dropped_no_response"],
            cfg.max_length,
        )
    if cache is not None:
        save_cached(cache, ts)
    report.append({"path": src.path, "split": split, **ts.stats, "cached": False})
    return ts
