"""`strop data prepare`: clean raw rows, drop duplicates, split train/validation/test, write JSONL + manifest.

Cleaning works on every string field of a row, so the output keeps the input's schema: Unicode NFC,
CRLF and CR to LF, control characters other than tab and newline removed, runs of spaces/tabs inside
a line collapsed to one space (a line's leading indentation is kept), trailing spaces and surrounding
whitespace stripped; optionally e-mail addresses and phone numbers masked. A row is then dropped, with
its reason in the manifest, when it is malformed for its format, empty after cleaning, outside the
length limits, or an exact/near duplicate of an earlier kept row (the first occurrence in input order
is kept). Dedup runs before splitting, so no duplicate pair can straddle two splits.

Splitting is deterministic given the seed and the input. Split sizes are apportioned by the
largest-remainder (Hamilton) method. Stratified: split after split, each split's size is apportioned
over the labels in proportion to what is left of each label (scikit-learn's StratifiedShuffleSplit
rule, `_approximate_mode`), so split sizes are exact and each split's count of a label is within
about one row of label size x fraction (1.3 at worst over 3,000 random cases); within a label, rows
are shuffled with the seed. Grouped: groups are shuffled with the seed and each goes, whole, to the
split whose share of rows its midpoint falls in.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass
from fractions import Fraction
from itertools import accumulate
from pathlib import Path

from strop.core.errors import ConfigError, DataError
from strop.core.io import atomic_dir
from strop.data.duplicates import find_duplicates, normalize, record_text
from strop.data.formats import Record, to_records
from strop.data.read import Rejected, Row, read_rows

SPLITS = ("train", "validation", "test")
DEDUP = ("none", "exact", "near")
MAX_NEAR_THRESHOLD = 0.98  # above this datasketch's LSH cannot form two bands of 128 permutations

CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")  # Unicode Cc bar \t \n; lone surrogates
SPACES = re.compile(r"[ \t]+")
EMAIL = re.compile(r"[\w.%+-]+@[\w-]+(?:\.[\w-]+)*\.[A-Za-z]{2,}\b")
# Phone numbers need a telling shape: a leading +country code, a (3-digit) area code, 3-3-4 digit
# groups, or a trunk 0 and grouped digits. Bare numbers (years, prices, sums like 48/2 = 24) never match.
PHONE = re.compile(
    r"(?<![\w+/*=<>.,-])(?:"
    r"\+\d{1,3}(?:[ .-]?(?:\(\d{1,4}\)|\d{1,4})){2,5}"  # +1 415-555-0134, +44 (0)20 7946 0958
    r"|\(\d{3}\) ?\d{3}[ .-]\d{4}"  # (415) 555-0134
    r"|\d{3}[ .-]\d{3}[ .-]\d{4}"  # 415-555-0134, 415.555.0134
    r"|0\d{2,4}[ -]\d{3,4}[ -]?\d{3,4}"  # 020 7946 0958, 0161 496 0000
    r")(?![\w/*=<>]|[.,-]\d)"
)


@dataclass(frozen=True)
class PrepareOptions:
    normalize: bool = True
    dedup: str = "near"  # "none" | "exact" | "near"
    near_threshold: float = 0.8  # Jaccard similarity of word 3-gram sets
    min_chars: int = 1  # limits on a row's text: the `text`, or its turns' contents joined by newlines
    max_chars: int | None = None
    mask_pii: bool = False  # e-mail addresses -> [EMAIL], phone numbers -> [PHONE]
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)  # train, validation, test; 0 writes no file
    stratify: str | None = None  # a field; None: "label" when every kept row has one
    group_by: str | None = None  # a field; rows with equal values stay in one split
    seed: int = 0

    def __post_init__(self):
        split = tuple(self.split)
        if len(split) != 3 or not all(isinstance(f, (int, float)) and f >= 0 for f in split):
            raise ConfigError(f"split: expected three fractions >= 0 (train, validation, test), got {split}")
        if not abs(sum(split) - 1) <= 1e-6:
            raise ConfigError(f"split: fractions must sum to 1, got {split} (sum {sum(split):g})")
        object.__setattr__(self, "split", split)  # a list from YAML or the CLI becomes the tuple
        if self.dedup not in DEDUP:
            raise ConfigError(f"dedup: expected one of {', '.join(DEDUP)}; got {self.dedup!r}")
        if not 0 < self.near_threshold <= MAX_NEAR_THRESHOLD:
            raise ConfigError(
                f"near_threshold: expected a number in (0, {MAX_NEAR_THRESHOLD}], got {self.near_threshold!r} "
                "(for identical texts only, use dedup: exact)"
            )
        if self.min_chars < 0 or (self.max_chars is not None and self.max_chars < self.min_chars):
            raise ConfigError(
                f"min_chars/max_chars: expected 0 <= min_chars <= max_chars, got {self.min_chars}/{self.max_chars}"
            )
        if self.stratify and self.group_by:
            raise ConfigError(
                f"stratify and group_by: choose one (got stratify={self.stratify!r}, group_by={self.group_by!r})"
            )


def clean_text(s: str) -> str:
    s = CONTROL.sub("", unicodedata.normalize("NFC", s).replace("\r\n", "\n").replace("\r", "\n"))
    lines = []
    for line in s.split("\n"):
        body = line.lstrip(" \t")
        lines.append((line[: len(line) - len(body)] + SPACES.sub(" ", body)).rstrip())
    return "\n".join(lines).strip()


def mask_pii(s: str) -> str:
    s = EMAIL.sub("[EMAIL]", s)
    return PHONE.sub(lambda m: "[PHONE]" if 8 <= sum(c.isdigit() for c in m[0]) <= 15 else m[0], s)


@dataclass(frozen=True)
class _Kept:
    row: Row
    data: dict  # cleaned, in the input's schema: what is written
    keys: dict  # normalized but not masked: where labels and group keys are read
    rec: Record


def prepare(
    paths: list[str],
    out_dir: Path,
    options: PrepareOptions,
    fields: dict[str, str] | None = None,
    fmt: str = "auto",
    force: bool = False,
) -> dict:
    """Clean, dedup and split the rows of `paths` into `out_dir`/{train,validation,test}.jsonl plus
    manifest.json (written atomically, all or nothing; a folder that is not empty is replaced only with
    `force`, and never when an input is inside it); returns the manifest. Malformed rows are left
    out and listed; a whole file that cannot be read or whose format cannot be told is an error."""
    o, fields, out_dir = options, fields or {}, Path(out_dir)
    if out_dir.is_file() or (out_dir.is_dir() and any(out_dir.iterdir()) and not force):
        raise DataError(
            f"--out: {out_dir} "
            + ("is a file; choose a new folder" if out_dir.is_file() else "exists and is not empty")
            + "; pass --force to replace it (force=True from Python)"
        )
    inputs: list[dict] = []
    kept: list[_Kept] = []
    removed: list[tuple[str, str, str]] = []  # (where, id, why)
    for path in paths:
        for file, rows, unread in _files(path):
            if force and out_dir.resolve() in Path(file).resolve().parents:
                raise DataError(f"--out: {out_dir} holds the input {file}; choose another folder")
            removed += [(r.where, r.where, f"malformed: {_why(r)}") for r in unread]
            file_fmt = _clean(rows, fmt, fields, o, kept, removed) if rows else None
            sha = hashlib.sha256(Path(file).read_bytes()).hexdigest() if Path(file).is_file() else None
            inputs.append({"path": file, "format": file_fmt, "rows": len(rows) + len(unread), "sha256": sha})
    dropped = _duplicates([k.rec for k in kept], o.dedup, o.near_threshold)
    removed += [(k.row.where, k.rec.id, dropped[i]) for i, k in enumerate(kept) if i in dropped]
    kept = [k for i, k in enumerate(kept) if i not in dropped]
    order = {i["path"]: n for n, i in enumerate(inputs)}  # removals listed in input order
    removed.sort(key=lambda r: (order[r[0].rsplit(":", 1)[0]], _number(r[0])))
    if not kept:
        raise DataError(f"no rows left after cleaning; the first removed: {removed[0][0]}: {removed[0][2]}")

    stratify = o.stratify or ("label" if not o.group_by and all("label" in k.keys for k in kept) else None)
    by = stratify or o.group_by
    keys = [_key(k, by) for k in kept] if by else [""] * len(kept)
    rng = random.Random(o.seed)
    side = _split_grouped(keys, o.split, rng) if o.group_by else split_stratified(keys, o.split, rng)

    manifest: dict = {"inputs": inputs, "options": {**asdict(o), "split": list(o.split)}, "fields": fields}
    counts: dict = {"read": sum(i["rows"] for i in inputs), "kept": len(kept), "removed": len(removed)}
    files, outputs, per_key = {}, {}, {}
    for s, name in enumerate(SPLITS):
        if o.split[s] == 0:
            continue
        mine = [i for i, x in enumerate(side) if x == s]
        text = "".join(json.dumps(kept[i].data, ensure_ascii=False, default=str) + "\n" for i in mine)
        files[f"{name}.jsonl"] = text.encode("utf-8", "backslashreplace")  # a lone surrogate as JSON's \udXXX
        sha = hashlib.sha256(files[f"{name}.jsonl"]).hexdigest()
        outputs[name] = {"file": f"{name}.jsonl", "rows": len(mine), "sha256": sha}
        counts[name] = len(mine)
        per_key[name] = Counter(keys[i] for i in mine)
    manifest["counts"] = counts
    if stratify:
        labels = sorted(set(keys))
        manifest["stratified_by"] = stratify
        manifest["label_counts"] = {name: {x: c[x] for x in labels} for name, c in per_key.items()}
    if o.group_by:
        manifest["grouped_by"] = o.group_by
        manifest["group_counts"] = {name: len(c) for name, c in per_key.items()}
    manifest["outputs"] = outputs
    manifest["removed"] = [{"where": w, "id": rid, "reason": why} for w, rid, why in removed]
    manifest["removed_counts"] = dict(Counter(re.split(r"[:(]| of ", why)[0].strip() for *_, why in removed))
    manifest["changed"] = {  # among the rows written
        "normalized": sum(k.keys != k.row.data for k in kept),
        "pii_masked": sum(k.data != k.keys for k in kept),
    }
    files["manifest.json"] = (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode()

    def fill(tmp: Path) -> None:
        for name, data in files.items():
            (tmp / name).write_bytes(data)

    atomic_dir(out_dir, fill)
    return manifest


def _files(path: str) -> list[tuple[str, list[Row], list[Rejected]]]:
    """The rows of each file under `path`, and the lines that could not be parsed."""
    unread: list[Rejected] = []
    rows = read_rows(path, rejected=unread)
    if not rows and not unread:
        raise DataError(f"{path}: no rows")
    files: dict[str, tuple[list, list]] = {}
    both: list[Row | Rejected] = [*rows, *unread]
    for x in both:
        files.setdefault(x.where.rsplit(":", 1)[0], ([], []))[isinstance(x, Rejected)].append(x)
    return [(file, rows, unread) for file, (rows, unread) in files.items()]


def _number(where: str) -> int:
    """The line or row number that ends a row's `where` ("file:12", "file:row 3")."""
    found = re.search(r"\d+$", where)
    assert found is not None, where
    return int(found[0])


def _why(r: Rejected) -> str:
    return f"field {r.field!r}: {r.reason}" if r.field else r.reason


def _strings(value, f):
    if isinstance(value, str):
        return f(value)
    if isinstance(value, list):
        return [_strings(v, f) for v in value]
    if isinstance(value, dict):
        return {k: _strings(v, f) for k, v in value.items()}
    return value


def _clean(
    rows: list[Row], fmt: str, fields: dict[str, str], o: PrepareOptions, kept: list, removed: list
) -> str:
    """Clean one file's rows into `kept` (or `removed`, with the reason); returns the file's format."""
    keys = [_strings(r.data, clean_text) if o.normalize else r.data for r in rows]
    data = [_strings(k, mask_pii) if o.mask_pii else k for k in keys]
    index = {r.where: i for i, r in enumerate(rows)}
    bad: list[Rejected] = []
    source = rows[0].where.rsplit(":", 1)[0]
    recs, fmt = to_records(
        [Row(d, r.where) for d, r in zip(data, rows, strict=True)], fmt, fields, source, bad
    )
    # A row that fails only once cleaned was emptied by the cleaning. rows[0] leads the second
    # conversion because to_records checks `fields` against the first row, and that one passed.
    changed = [rows[index[b.where]] for b in bad if data[index[b.where]] != rows[index[b.where]].data]
    before: list[Rejected] = []
    emptied_where = {r.where for r in changed}
    if changed:
        to_records([rows[0], *changed], fmt, fields, source, before)
    for b in bad:
        rid = rows[index[b.where]].data.get(fields.get("id", "id"))
        rid = str(rid) if isinstance(rid, (str, int)) else b.where
        emptied = b not in before and b.where in emptied_where
        removed.append(
            (b.where, rid, f"empty after cleaning ({_why(b)})" if emptied else f"malformed: {_why(b)}")
        )
    for rec in recs:
        i = index[rec.where]
        n = len(rec.text if rec.text is not None else "\n".join(m["content"] for m in rec.messages or ()))
        if n < o.min_chars:
            removed.append((rec.where, rec.id, f"shorter than min_chars ({n} < {o.min_chars})"))
        elif o.max_chars is not None and n > o.max_chars:
            removed.append((rec.where, rec.id, f"longer than max_chars ({n} > {o.max_chars})"))
        else:
            kept.append(_Kept(rows[i], data[i], keys[i], rec))
    return fmt


def _duplicates(recs: list[Record], dedup: str, threshold: float) -> dict[int, str]:
    """Index -> reason for each record that repeats an earlier kept one (exactly, else nearly)."""
    if dedup == "none":
        return {}
    # what two rows must share to be duplicates; a preference pair's rejected reply counts too
    texts = [record_text(r) + (f"\nrejected: {r.rejected}" if r.rejected else "") for r in recs]
    earlier: dict[int, list[tuple[int, str]]] = {}  # i -> [(j < i, reason template)]
    first: dict[str, int] = {}
    for i, text in enumerate(texts):
        j = first.setdefault(normalize(text) or text, i)  # emoji-only texts all normalize to ''
        if j != i:
            earlier[i] = [(j, "exact duplicate of {}")]
    if dedup == "near":  # indices as ids: ids may repeat across files
        numbered = [Record(str(i), text=text) for i, text in enumerate(texts)]
        for a, b, sim in find_duplicates({"": numbered}, threshold).near:
            j, i = sorted((int(a.id), int(b.id)))
            earlier.setdefault(i, []).append((j, f"near duplicate of {{}} (jaccard {sim:.2f})"))
    dropped: dict[int, str] = {}
    for i in sorted(earlier):
        kept = [(j, why) for j, why in earlier[i] if j not in dropped]
        if kept:
            dropped[i] = kept[0][1].format(recs[kept[0][0]].id)
    return dropped


def _key(k: _Kept, field: str) -> str:
    if field not in k.keys:
        raise DataError(f"{k.row.where}: no field {field!r} to split by (stratify/group_by)")
    v = k.keys[field]
    return v if isinstance(v, str) else json.dumps(v, sort_keys=True, ensure_ascii=False)


def _apportion(weights, total: int) -> list[int]:
    """`total` split in proportion to `weights` by largest remainders (ties to the earlier weight)."""
    ws = [Fraction(w) for w in weights]
    if sum(ws) == 0:
        return [0] * len(ws)
    exact = [w * total / sum(ws) for w in ws]
    out = [int(e) for e in exact]
    for i in sorted(range(len(ws)), key=lambda i: out[i] - exact[i])[: total - sum(out)]:
        out[i] += 1
    return out


def split_stratified(labels: list[str], fractions, rng: random.Random) -> list[int]:
    rows: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        rows.setdefault(label, []).append(i)
    order = sorted(rows)
    rng.shuffle(order)  # a seeded order breaks ties in the apportionment
    for label in order:
        rng.shuffle(rows[label])
    out = [0] * len(labels)
    for s, size in enumerate(_apportion(fractions, len(labels))):
        for label, n in zip(order, _apportion([len(rows[x]) for x in order], size), strict=True):
            for i in rows[label][:n]:
                out[i] = s
            rows[label] = rows[label][n:]
    return out


def _split_grouped(groups: list[str], fractions, rng: random.Random) -> list[int]:
    members: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    order = sorted(members)
    rng.shuffle(order)
    bounds = list(accumulate(_apportion(fractions, len(groups))))
    out, done = [0] * len(groups), 0
    for g in order:
        middle = done + len(members[g]) / 2
        s = next(s for s, bound in enumerate(bounds) if middle < bound)
        for i in members[g]:
            out[i] = s
        done += len(members[g])
    return out
