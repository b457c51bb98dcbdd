"""`strop data check`: read the data exactly as training would and say what is wrong with it.

What it finds, per source and per split: rows and the format detected; rejected rows (file:line, field,
reason); exact and near duplicates within each split and across splits (leakage), by example id; the
token-length distribution under the run's template and maximum length, the examples that would be
truncated or whose response would be cut away entirely, and the tokens that carry loss; the label
distribution of labelled data. Problems that cost a run (rejected rows, leakage into given evaluation
files, responses cut away) are `errors`; the rest are `warnings`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from strop.core.config import DataConfig, DatasetSource
from strop.core.errors import DataError
from strop.data.build import (
    Datasets,
    SourceWatch,
    build_datasets,
    source_rows,
    split_records,
    watched_records,
)
from strop.data.duplicates import Duplicates, find_duplicates, record_text
from strop.data.formats import Record, to_records
from strop.data.leakage import LEAK_CHECK_MAX_EXAMPLES
from strop.data.read import Rejected
from strop.data.template import ChatTemplate
from strop.data.tokenized import TokenizedSet, tokenize_records

LISTED = 20  # ids shown per finding in the text report (the JSON report has them all)
IMBALANCE = 10.0  # most / least frequent label above this is a warning
UNCUT = 1 << 30  # max_length that cuts nothing


@dataclass
class CheckResult:
    report: dict
    train: TokenizedSet | None = None  # what training would see, for the estimate

    @property
    def errors(self) -> list[str]:
        return self.report["errors"]


@dataclass
class _Seen:
    """What the check keeps of each record of a split as it streams past: its id and label, and its
    text for the duplicate search only while all splits together are few enough to search
    (`LEAK_CHECK_MAX_EXAMPLES`); past that, no text is held."""

    ids: list[str] = field(default_factory=list)
    labels: list[str | None] = field(default_factory=list)
    texts: list[str] | None = field(default_factory=list)


def check_data(
    cfg: DataConfig, template: ChatTemplate, seed: int, length_findings: bool = True
) -> CheckResult:
    """`length_findings: False`: the caller checks lengths (preference pairs are cut differently), so
    rows are tokenized here uncut, for duplicates, leakage and label balance only.

    Each source is read once, as training reads it (rows -> records -> tokens in chunks); what the
    findings need of a record (id, label, text while duplicates are searched) is kept as it passes."""
    report: dict = {"sources": [], "errors": [], "warnings": [], "notes": []}
    lenient = cfg.model_copy(update={"skip_bad_rows": True, "allow_leakage": True})
    if not length_findings:
        lenient = lenient.model_copy(update={"max_length": UNCUT})
    seen = {"train": _Seen(), "validation": _Seen(), "test": _Seen()}
    watches: dict[int, SourceWatch] = {}

    def watch(src: DatasetSource, split: str) -> SourceWatch:
        kept = seen[split]

        def record(rec: Record) -> None:
            kept.ids.append(rec.id)
            kept.labels.append(rec.label)
            if sum(len(k.ids) for k in seen.values()) > LEAK_CHECK_MAX_EXAMPLES:
                for k in seen.values():
                    k.texts = None
            elif kept.texts is not None:
                kept.texts.append(record_text(rec))

        watches[id(src)] = SourceWatch(record)
        return watches[id(src)]

    try:
        data = build_datasets(lenient, template, seed, watch=watch)
    except DataError:
        # a source without rows or usable records: report every source, as read on its own
        for split, sources in (("train", cfg.train), ("validation", cfg.validation), ("test", cfg.test)):
            for src in sources:
                report["sources"].append(_check_source(src, split, report, cfg.max_row_bytes))
        if report["errors"] and not any(s.get("valid") for s in report["sources"] if s["split"] == "train"):
            return CheckResult(report)  # nothing readable to tokenize
        raise
    test_parts = [
        tokenize_records(
            watched_records(src, lenient, watch(src, "test")),
            template,
            lenient.max_length,
            cfg.train_on_prompt,
        )
        for src in cfg.test
    ]
    for split, sources in (("train", cfg.train), ("validation", cfg.validation), ("test", cfg.test)):
        for src in sources:
            report["sources"].append(_source_entry(src, split, watches[id(src)], report))

    wanted = {"train": set(data.train.example_ids)}
    wanted["validation"] = set(data.validation.example_ids) if data.validation is not None else set()
    pools = {"train": seen["train"], "validation": seen["validation" if cfg.validation else "train"]}
    picked = {
        split: [i for i, e in enumerate(pools[split].ids) if e in wanted[split]]
        for split in ("train", "validation")
    }
    picked["test"] = list(range(len(seen["test"].ids)))
    pools["test"] = seen["test"]
    del wanted
    sets = {"train": data.train, "validation": data.validation}
    if cfg.test:
        sets["test"] = TokenizedSet.concat(test_parts)
    report["splits"] = {k: len(v) for k, v in picked.items()}
    report["validation_from"] = "files" if cfg.validation else f"val_fraction {cfg.val_fraction}"
    if data.summary.get("mixture"):
        report["mixture"] = data.summary["mixture"]
    report["tokens"] = {
        k: _token_stats(ts, cfg.max_length, own_drops=k != "validation" or bool(cfg.validation))
        for k, ts in sets.items()
        if ts
    }
    for split, t in report["tokens"].items() if length_findings else ():  # uncut: nothing to say
        if t["response_cut_away"]:
            report["errors"].append(
                f"{split}: {t['response_cut_away']} example(s) lose their whole response at max_length "
                f"{cfg.max_length} and would be dropped, e.g. {', '.join(t['response_cut_away_ids'][:3])}"
            )
        if t["truncated"]:
            report["warnings"].append(
                f"{split}: {t['truncated']} example(s) are longer than max_length {cfg.max_length} and "
                f"would be truncated, e.g. {', '.join(t['truncated_ids'][:3])}"
            )
    _label_balance({k: [pools[k].labels[i] for i in v] for k, v in picked.items()}, report)
    if sum(map(len, picked.values())) > LEAK_CHECK_MAX_EXAMPLES:
        report["notes"].append(f"duplicates not checked: over {LEAK_CHECK_MAX_EXAMPLES} examples")
    else:
        splits = _split_texts(pools, picked, lenient, data)
        _duplicates(find_duplicates(splits), splits, cfg, report)
    return CheckResult(report, data.train)


def _split_texts(
    pools: dict[str, _Seen], picked: dict[str, list[int]], cfg: DataConfig, data: Datasets
) -> dict[str, list[Record]]:
    """The splits as records carrying the text duplicates are judged by. Texts were let go when more
    records were read than are searched (many dropped as cut away): then the sources are read again."""
    texts = {k: pools[k].texts for k in picked}
    if any(t is None for t in texts.values()):
        return split_records(cfg, data)
    return {k: [Record(pools[k].ids[i], text=texts[k][i]) for i in v] for k, v in picked.items()}  # type: ignore[index]


def _source_entry(src: DatasetSource, split: str, watch: SourceWatch, report: dict) -> dict:
    """A source's rows, usable records, format, rejected rows and labels, as its reader counted them."""
    reader = watch.reader
    assert reader is not None  # every source is read through its watch
    rejected = reader.rejected or []
    entry = {
        "split": split,
        "path": src.path,
        "rows": reader.rows + reader.unparsed,
        "valid": reader.valid,
        "rejected": len(rejected),
        "rejected_rows": [{"where": r.where, "field": r.field, "reason": r.reason} for r in rejected],
        "format": reader.format,
        "format_detected": src.format == "auto",
    }
    if rejected:
        report["errors"].append(f"{src.path}: {len(rejected)} malformed row(s), e.g. {rejected[0]}")
    if not reader.valid:
        report["errors"].append(f"{src.path}: no usable rows")
    if reader.labels:
        entry["labels"] = dict(reader.labels.most_common())
    return entry


def _check_source(src, split: str, report: dict, max_row_bytes: int) -> dict:
    entry = {"split": split, "path": src.path, "rows": 0, "valid": 0, "rejected": 0, "rejected_rows": []}
    rejected: list[Rejected] = []
    # a missing file or an undetectable format is no finding about rows: it ends the check (exit 2)
    rows = source_rows(src, rejected, max_row_bytes)
    unparsed = len(rejected)
    records, fmt = to_records(rows, src.format, src.fields, src.path, rejected) if rows else ([], "?")
    entry.update(
        rows=len(rows) + unparsed,
        valid=len(records),
        format=fmt,
        format_detected=src.format == "auto",
        rejected=len(rejected),
        rejected_rows=[{"where": r.where, "field": r.field, "reason": r.reason} for r in rejected],
    )
    if rejected:
        report["errors"].append(f"{src.path}: {len(rejected)} malformed row(s), e.g. {rejected[0]}")
    if not records:
        report["errors"].append(f"{src.path}: no usable rows")
    labels = Counter(r.label for r in records if r.label is not None)
    if labels:
        entry["labels"] = dict(labels.most_common())
    return entry


def _token_stats(ts: TokenizedSet, max_length: int, own_drops: bool) -> dict:
    """`own_drops`: the set's stats list its own dropped examples (not so for a split held out of the
    training files: those are listed under train)."""
    ids = set(ts.example_ids)
    lengths = np.array([len(x) for x in ts.ids]) if len(ts) else np.zeros(1, int)
    truncated = [e for e in ts.stats.get("truncated_ids", []) if e in ids]
    dropped = ts.stats.get("dropped_ids", []) if own_drops else []
    p50, p90, p99 = np.percentile(lengths, [50, 90, 99])
    return {
        "examples": len(ts),
        "tokens": int(lengths.sum()),
        "label_tokens": ts.label_tokens(),
        "p50": float(p50),
        "p90": float(p90),
        "p99": float(p99),
        "max": int(lengths.max()),
        "max_length": max_length,
        "truncated": len(truncated),
        "truncated_ids": truncated,
        "response_cut_away": len(dropped),
        "response_cut_away_ids": dropped,
    }


def _label_balance(splits: dict[str, list[str | None]], report: dict) -> None:
    """`splits`: the label (or None) of each record of each split."""
    for split, records in splits.items():
        labels = Counter(label for label in records if label is not None)
        if not labels:
            continue
        report.setdefault("labels", {})[split] = dict(labels.most_common())
        if len(labels) > 1 and max(labels.values()) / min(labels.values()) > IMBALANCE:
            report["warnings"].append(
                f"{split}: labels are imbalanced ({', '.join(f'{k} {v}' for k, v in labels.most_common())})"
            )
        if split == "train" and len(labels) == 1:
            report["warnings"].append(f"train: every example has the label {next(iter(labels))!r}")


def _duplicates(dups: Duplicates, splits: dict[str, list[Record]], cfg: DataConfig, report: dict) -> None:
    within = {}
    for split, records in splits.items():
        if not records:
            continue
        groups = [[e.id for e in g if e.split == split] for g in dups.exact]
        groups = [g for g in groups if len(g) > 1]
        near = [[a.id, b.id, round(s, 3)] for a, b, s in dups.near if a.split == b.split == split]
        within[split] = {"repeats": dups.within(split), "exact_groups": groups, "near_pairs": near}
        if within[split]["repeats"]:
            report["warnings"].append(
                f"{split}: {within[split]['repeats']} example(s) repeat another of the same split "
                f"({len(groups)} exact group(s), {len(near)} near pair(s))"
            )
    report["duplicates"] = within
    leaks = {}
    for a, b in (("train", "validation"), ("train", "test"), ("validation", "test")):
        if not splits[a] or not splits[b]:
            continue
        pairs = [[y.id, x.id, kind] for x, y, kind in dups.leaks(a, b)]
        leaks[f"{a}_{b}"] = pairs
        if not pairs:
            continue
        what = f"{len({p[0] for p in pairs})} {b} example(s) copy {a} examples, e.g. " + ", ".join(
            f"{p[0]} ~ {p[1]} ({p[2]})" for p in pairs[:3]
        )
        if a == "train" and b == "validation" and not cfg.validation:
            report["notes"].append(f"{what}: training takes them out of its held-out validation split")
        elif a == "validation":
            report["warnings"].append(what)
        elif cfg.allow_leakage:
            report["warnings"].append(f"{what} (data.allow_leakage: true)")
        else:
            report["errors"].append(f"leakage: {what}; training will refuse to start")
    report["leakage"] = leaks
