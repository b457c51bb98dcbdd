"""DataConfig -> tokenized train and validation sets, with a summary of what was read and dropped."""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from strop.core.config import DataConfig, DatasetSource
from strop.core.data_config import MAX_ROW_BYTES, AugmentConfig
from strop.core.errors import DataError
from strop.data.augment import AugmentOptions, augment, is_copy, original_id
from strop.data.formats import Record, stream_records, to_records
from strop.data.mixture import mix
from strop.data.read import SUFFIXES, Rejected, Row, iter_rows
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
    validation_groups: dict[str, list[int]] | None = None  # source name -> validation indices (mixtures)


def build_datasets(
    cfg: DataConfig,
    template: ChatTemplate,
    seed: int,
    templates: dict[str, ChatTemplate] | None = None,
    progress: bool = True,
    watch: Callable[[DatasetSource, str], SourceWatch] | None = None,
) -> Datasets:
    """`templates`: a source's own template by its name (`data.train[].template`), else `template`.

    Each source is streamed (rows -> records -> tokens, `CHUNK_RECORDS` at a time), so memory holds
    the tokens and example ids, not the rows. `progress`: False never shows the tokenize bar (True:
    on a terminal, unless `-q`). `watch(src, split)`: what a data check keeps of each source's records
    as they pass (read once, also when the tokens come from the cache)."""
    sources: list[dict] = []

    def load(src: DatasetSource, split: str) -> TokenizedSet:
        own = (templates or {}).get(src.label, template)
        seen = watch(src, split) if watch is not None else None
        return _load_source(src, cfg, own, sources, split, seed if split == "train" else None, progress, seen)

    parts = [load(s, "train") for s in cfg.train]
    labels = [s.label for s in cfg.train]  # one string per source, shared by its examples
    source_of = {eid: name for name, part in zip(labels, parts, strict=True) for eid in part.example_ids}
    mixture = None
    if cfg.mixture is not None:
        parts, mixture = mix(parts, [_ratio(s) for s in cfg.train], [s.label for s in cfg.train], cfg, seed)
    train = TokenizedSet.concat(parts)
    if cfg.validation:
        val_parts = [load(s, "validation") for s in cfg.validation]
        names = [s.label for s in cfg.validation]
        source_of.update({eid: n for n, p in zip(names, val_parts, strict=True) for eid in p.example_ids})
        val = TokenizedSet.concat(val_parts)
    elif cfg.val_fraction > 0 and len(train) >= 2:
        val_index = held_out(train.example_ids, cfg.val_fraction, seed)
        in_train = np.ones(len(train), bool)
        in_train[val_index] = False
        val, train = train.subset(val_index), train.subset(np.flatnonzero(in_train))
        # augmented copies and repeats train only: the original's other copies went to validation with it
        val = val.subset([i for i, e in enumerate(val.example_ids) if not is_copy(e)])
    else:
        val = None
    removed = 0
    if val is not None and not cfg.validation:  # given files: the leakage guard refuses or reports
        keep = _not_in(val, train)
        removed = len(val) - len(keep)
        val = val.subset(keep) if keep else None
    if len(train) == 0:
        raise DataError(
            "no training examples left after tokenization (all responses truncated away?); "
            "raise data.max_length"
        )
    groups: dict[str, list[int]] | None = None
    if val is not None and len(cfg.validation or cfg.train) > 1:  # validation drawn from several sources
        groups = {}
        for i, eid in enumerate(val.example_ids):
            groups.setdefault(source_of.get(eid, "?"), []).append(i)
    summary = {
        "sources": sources,
        **({"mixture": mixture} if mixture else {}),
        "train_examples": len(train),
        "validation_examples": len(val) if val is not None else 0,
        "validation_duplicates_of_train_removed": removed,
        "train_label_tokens": train.label_tokens(),
        "train_tokens": int(train.lengths().sum()),
        **length_summary(train, val, cfg.max_length),
    }
    if removed:
        log.warning("removed %d validation example(s) that duplicate training examples", removed)
    return Datasets(train, val, summary, groups)


def add_replay(
    data: Datasets, earlier: list[TokenizedSet], names: list[str], fraction: float, seed: int
) -> Datasets:
    """Mix earlier stages' training examples into `data.train` so they make up `fraction` of it
    (sequential fine-tuning's guard against forgetting). Drawn uniformly from all earlier stages together
    (so each in proportion to its size), without repeats unless the earlier data is too small, in which
    case every example is used once and repeats get their own id (`id~repK`). Validation is unchanged."""
    pool = TokenizedSet.concat(earlier)
    stage_of = [name for name, part in zip(names, earlier, strict=True) for _ in range(len(part))]
    k = round(fraction / (1 - fraction) * len(data.train))
    if k == 0 or len(pool) == 0:
        return data
    rng = np.random.default_rng([seed, 11])
    if k <= len(pool):
        picked = sorted(rng.choice(len(pool), size=k, replace=False).tolist())
    else:
        picked = list(range(len(pool))) + rng.choice(len(pool), size=k - len(pool), replace=True).tolist()
    replay = pool.subset(picked)
    seen: dict[str, int] = {}
    for i, eid in enumerate(replay.example_ids):
        seen[eid] = seen.get(eid, 0) + 1
        if seen[eid] > 1:
            replay.example_ids[i] = f"{eid}~rep{seen[eid] - 1}"
    train = TokenizedSet.concat([data.train, replay])
    train.stats = data.train.stats
    by_stage = Counter(stage_of[i] for i in picked)
    summary = {
        **data.summary,
        "replay": {
            "fraction": fraction,
            "examples": k,
            "share": round(k / len(train), 4),
            "repeats": max(0, k - len(pool)),
            "from": {name: by_stage.get(name, 0) for name in names},
        },
        "train_examples": len(train),
        "train_label_tokens": train.label_tokens(),
        "train_tokens": int(train.lengths().sum()),
    }
    log.info(
        "data: replay of %d earlier-stage examples (%.0f%% of training): %s",
        k,
        100 * k / len(train),
        ", ".join(f"{n} {c}" for n, c in summary["replay"]["from"].items()),
    )
    return Datasets(train, data.validation, summary, data.validation_groups)


def _ratio(src: DatasetSource) -> float:
    assert src.ratio is not None  # DataConfig: data.mixture needs a ratio on every training source
    return src.ratio


def split_records(cfg: DataConfig, data: Datasets) -> dict[str, list[Record]]:
    """The records behind each split (train and validation as built, test as given), read once for
    the checks and the evaluation that need text rather than tokens."""
    train_ids = set(data.train.example_ids)
    val_ids = set(data.validation.example_ids) if data.validation is not None else set()

    def read(src: DatasetSource) -> list[Record]:
        return read_records(src, [] if cfg.skip_bad_rows else None, cfg.max_row_bytes)

    train_records = [r for s in cfg.train for r in read(s)]
    pool = [r for s in cfg.validation for r in read(s)] if cfg.validation else train_records
    return {
        "train": [r for r in train_records if r.id in train_ids],
        "validation": [r for r in pool if r.id in val_ids],
        "test": [r for s in cfg.test for r in read(s)],
    }


def length_summary(train: TokenizedSet, val: TokenizedSet | None, max_length: int) -> dict:
    """Token-length histogram (16 bins up to max_length) and percentiles per split, for the report."""
    edges = np.linspace(0, max_length, 17).round().astype(int)
    hist, pct = {"edges": edges.tolist()}, {}
    for name, ts in (("train", train), ("validation", val)):
        if ts is None or len(ts) == 0:
            continue
        lengths = ts.lengths()
        hist[name] = np.histogram(lengths, bins=edges)[0].tolist()
        p50, p90 = np.percentile(lengths, [50, 90])
        pct[name] = {"p50": float(p50), "p90": float(p90), "max": int(lengths.max())}
    return {"length_histogram": hist, "length_percentiles": pct}


def read_records(
    src: DatasetSource, rejected: list[Rejected] | None = None, max_row_bytes: int = MAX_ROW_BYTES
) -> list[Record]:
    """A source's rows as records (no tokenization), e.g. for generation-based evaluation. Malformed
    rows (and rows over `max_row_bytes`) are an error, or are appended to `rejected` and left out when
    it is given."""
    rows = source_rows(src, rejected, max_row_bytes)
    return to_records(rows, src.format, src.fields, src.path, rejected)[0]


def source_rows(
    src: DatasetSource, rejected: list[Rejected] | None = None, max_row_bytes: int = MAX_ROW_BYTES
) -> list:
    """The rows a source selects: `skip` rows left out, then at most `limit`."""
    return list(stream_source_rows(src, rejected, max_row_bytes))


def stream_source_rows(
    src: DatasetSource, rejected: list[Rejected] | None = None, max_row_bytes: int = MAX_ROW_BYTES
) -> Iterator[Row]:
    """`source_rows` as a stream; a `skip` that leaves no rows is an error once the source is read."""
    n = 0
    for row in iter_rows(
        src.path,
        split=src.split,
        limit=src.limit + src.skip if src.limit else None,
        rejected=rejected,
        max_row_bytes=max_row_bytes,
    ):
        n += 1
        if n > src.skip:
            yield row
    if src.skip and n <= src.skip:
        raise DataError(f"{src.path}: skip {src.skip} leaves no rows (the source has {n})")


class SourceReader:
    """A source's records as a stream (rows -> records, a chunk at a time downstream), counting what
    it reads: rows, rows the reader rejected, labels. The format is detected on construction."""

    def __init__(self, src: DatasetSource, rejected: list[Rejected] | None, max_row_bytes: int):
        self.src, self.rejected = src, rejected
        self.rows = 0  # rows read (after skip and limit), bad ones not included
        self.unparsed = 0  # rows the reader rejected (before conversion), once the stream has ended
        self.valid = 0  # records converted
        self.labels: Counter = Counter()
        self.records, self.format = stream_records(
            self._rows(max_row_bytes), src.format, src.fields, src.path, rejected
        )

    def _rows(self, max_row_bytes: int) -> Iterator[Row]:
        for row in stream_source_rows(self.src, self.rejected, max_row_bytes):
            self.rows += 1
            yield row
        self.unparsed = len(self.rejected or [])

    def __iter__(self) -> Iterator[Record]:
        for rec in self.records:
            self.valid += 1
            if rec.label is not None:
                self.labels[rec.label] += 1
            yield rec


@dataclass
class SourceWatch:
    """What a caller of `build_datasets` (the data check) sees of one source: its reader, and each
    record as it passes (`record`)."""

    record: Callable[[Record], None]
    reader: SourceReader | None = None


def held_out(example_ids: list[str], fraction: float, seed: int) -> list[int]:
    """A seeded random fraction of examples, whole documents at a time: the windows of one long text
    ("id", "id#1", ...) stay on one side, so validation never sees text it trained on."""
    group_of: dict[str, int] = {}  # documents in order of first appearance
    group = np.fromiter(
        (group_of.setdefault(original_id(e), len(group_of)) for e in example_ids), np.int64, len(example_ids)
    )
    del group_of
    sizes = np.bincount(group, minlength=int(group.max(initial=-1)) + 1).tolist()
    order = list(range(len(sizes)))
    random.Random(seed).shuffle(order)  # the same permutation as shuffling the ids themselves
    target = max(1, round(len(example_ids) * fraction))
    picked, n = [], 0
    for k in order:
        if n >= target or n + sizes[k] >= len(example_ids):
            break
        picked.append(k)
        n += sizes[k]
    return np.flatnonzero(np.isin(group, picked)).tolist()


def _not_in(val: TokenizedSet, train: TokenizedSet) -> list[int]:
    """Validation examples whose tokens equal no training example's (hashed, then compared)."""

    def digests(ts: TokenizedSet) -> np.ndarray:
        return np.fromiter(
            (int.from_bytes(hashlib.blake2b(x.tobytes(), digest_size=8).digest(), "little") for x in ts.ids),
            np.uint64,
            len(ts),
        )

    train_h, val_h = digests(train), digests(val)
    same = np.isin(val_h, train_h)
    by_hash: dict[int, list[int]] = {}
    for j in np.flatnonzero(np.isin(train_h, val_h[same])).tolist():
        by_hash.setdefault(int(train_h[j]), []).append(j)
    keep = []
    for i in range(len(val)):
        if same[i]:
            x = val.ids[i].tobytes()
            if any(train.ids[j].tobytes() == x for j in by_hash[int(val_h[i])]):
                continue
        keep.append(i)
    return keep


def _load_source(
    src: DatasetSource,
    cfg: DataConfig,
    template: ChatTemplate,
    report: list,
    split: str,
    augment_seed: int | None = None,
    progress: bool = True,
    watch: SourceWatch | None = None,
) -> TokenizedSet:
    """One source tokenized (from the cache when it holds it); training sources augmented if asked."""
    aug = cfg.augment if split == "train" else None
    cache = _cache_file(src, cfg, template, aug, augment_seed)
    if cache is not None:
        cached = load_cached(cache)
        if cached is not None:
            log.info("data: %s: %d tokenized examples from the cache %s", src.path, len(cached), cache)
            if watch is not None:  # the watcher reads the records all the same (no tokenizing)
                for _ in watched_records(src, cfg, watch):
                    pass
            report.append({"path": src.path, "split": split, **_brief(cached.stats), "cached": True})
            return cached
    reader = SourceReader(src, [] if cfg.skip_bad_rows else None, cfg.max_row_bytes)
    records: Iterable[Record] = reader if watch is None else watched_records(src, cfg, watch, reader)
    if aug is not None:  # copies follow all originals: augmenting holds the source's records
        originals = list(records)
        records = augment(
            originals,
            AugmentOptions(aug.copies, aug.paraphrase, aug.char_noise, aug.word_noise, augment_seed or 0),
        )
        log.info(
            "data: %s: %d augmented copies of %d examples",
            src.path,
            len(records) - len(originals),
            len(originals),
        )
        del originals
    t0 = time.perf_counter()
    ts = tokenize_records(
        records, template, cfg.max_length, cfg.train_on_prompt, progress=None if progress else False
    )
    del records
    seconds = time.perf_counter() - t0
    ts.stats.update(_read_stats(src, reader))
    n_tokens = int(ts.lengths().sum())
    log.info(
        "data: %s: tokenized %d examples (%d tokens) in %.1f s: %.0f tokens/s",
        src.path,
        len(ts),
        n_tokens,
        seconds,
        n_tokens / max(seconds, 1e-9),
    )
    if ts.stats["dropped_no_response"]:
        log.warning(
            "data: %s: dropped %d example(s) whose response was truncated away (max_length %d)",
            src.path,
            ts.stats["dropped_no_response"],
            cfg.max_length,
        )
    if cache is not None:
        save_cached(cache, ts)
    report.append({"path": src.path, "split": split, **_brief(ts.stats), "cached": False})
    return ts


def watched_records(
    src: DatasetSource, cfg: DataConfig, watch: SourceWatch, reader: SourceReader | None = None
) -> Iterator[Record]:
    """A source's records (from `reader`, else a new one), each shown to `watch` as it passes."""
    watch.reader = reader or SourceReader(src, [] if cfg.skip_bad_rows else None, cfg.max_row_bytes)
    for rec in watch.reader:
        watch.record(rec)
        yield rec


def _cache_file(
    src: DatasetSource,
    cfg: DataConfig,
    template: ChatTemplate,
    aug: AugmentConfig | None,
    augment_seed: int | None,
) -> Path | None:
    """Where the tokenized source is cached, keyed by everything that shapes it; None unless the source
    is local files (a hub dataset is not cached here)."""
    path = Path(src.path).expanduser()
    files = sorted(f for f in path.iterdir() if f.suffix in SUFFIXES) if path.is_dir() else [path]
    if not all(f.is_file() for f in files):
        return None
    key_parts = {
        "path": str(path.resolve()),
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
        "skip_bad_rows": cfg.skip_bad_rows,
        "max_row_bytes": cfg.max_row_bytes,
        "augment": [aug.model_dump(), augment_seed] if aug else None,
    }
    return Path(cfg.cache_dir or default_cache_dir()) / cache_key(key_parts, files)


def _read_stats(src: DatasetSource, reader: SourceReader) -> dict:
    """The stats of reading a source, once its stream has ended (logged as they were read)."""
    rejected = reader.rejected or []
    how = "given" if src.format != "auto" else "detected"
    log.info("data: %s: %d rows, format %s (%s)", src.path, reader.rows, reader.format, how)
    if rejected:
        log.warning(
            "data: %s: left out %d malformed row(s) (data.skip_bad_rows), e.g. %s",
            src.path,
            len(rejected),
            rejected[0],
        )
    return {
        "rows": reader.rows + reader.unparsed,
        "format": reader.format,
        "format_detected": how == "detected",
        "rejected_rows": len(rejected),
        "rejected": [str(r) for r in rejected],
        "labels": dict(reader.labels),
    }


def _brief(stats: dict, keep: int = 20) -> dict:
    """Stats for the data summary: lists of ids cut to their first `keep`."""
    return {k: v[:keep] if isinstance(v, list) else v for k, v in stats.items()}
