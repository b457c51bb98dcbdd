"""Read rows from JSONL, JSON, CSV, Parquet, a folder of them, or a Hugging Face dataset.

Each row keeps where it came from (`file:line`) so any later error can point at it.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from strop.core.errors import DataError
from strop.core.io import unreadable_file

SUFFIXES = {".jsonl", ".json", ".csv", ".parquet"}


@dataclass(frozen=True)
class Row:
    data: dict
    where: str  # "path:line" (line is 1-based) or "path:row N"


@dataclass(frozen=True)
class Rejected:
    """A row left out, and why: what `strop data check` lists and `data.skip_bad_rows` counts."""

    where: str
    field: str  # "" when the row could not be parsed at all
    reason: str

    def __str__(self) -> str:
        return (
            f"{self.where}: field {self.field!r}: {self.reason}"
            if self.field
            else f"{self.where}: {self.reason}"
        )


def read_rows(
    path: str, split: str = "train", limit: int | None = None, rejected: list[Rejected] | None = None
) -> list[Row]:
    """All rows of a file, a folder of files, or a Hugging Face dataset name.

    A row that cannot be parsed (invalid JSON or UTF-8, not an object, too many CSV values) stops the
    read with an error naming its line, unless `rejected` is given: then it is appended there and skipped.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix in SUFFIXES)
        if not files:
            raise DataError(f"{p}: folder holds no {'/'.join(sorted(SUFFIXES))} files")
    elif p.is_file():
        files = [p]
    elif (
        p.suffix in SUFFIXES
        or "/" not in path
        or path.startswith((".", "/", "~"))
        or Path(Path(path).parts[0]).exists()  # "data/trian": a mistyped local path, not a hub dataset
    ):
        why = unreadable_file(p)
        raise DataError(
            f"data file not found: {p}" if why in (None, "not found") else f"data file {p}: {why}"
        )
    else:
        return _read_hub(path, split, limit)
    rows: list[Row] = []
    for f in files:
        for row in _read_file(f):
            if isinstance(row, Rejected):
                if rejected is None:
                    raise DataError(str(row))
                rejected.append(row)
                continue
            rows.append(row)
            if limit and len(rows) >= limit:
                return rows
    return rows


def _read_file(f: Path) -> Iterator[Row | Rejected]:
    if f.suffix not in SUFFIXES:
        raise DataError(f"{f}: unsupported file type {f.suffix!r} (use .jsonl, .json, .csv or .parquet)")
    if f.suffix == ".jsonl":
        yield from _read_jsonl(f)
    elif f.suffix == ".json":
        yield from _read_json(f)
    elif f.suffix == ".csv":
        try:
            text = f.read_bytes().decode("utf-8-sig")  # -sig: Excel's "CSV UTF-8" starts with a BOM
        except UnicodeDecodeError as e:
            line = e.object.count(b"\n", 0, e.start) + 1
            raise DataError(f"{f}:{line}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
        reader = csv.DictReader(io.StringIO(text, newline=""))
        for rec in reader:
            where = f"{f}:{reader.line_num}"
            if None in rec:  # csv puts values beyond the header under the key None
                yield Rejected(
                    where, "", f"more values than the {len(reader.fieldnames or ())} header columns"
                )
            else:
                yield Row(dict(rec), where)
    else:
        import pyarrow.parquet as pq

        for i, rec in enumerate(pq.read_table(f).to_pylist()):
            yield Row(rec, f"{f}:row {i + 1}")


def _read_jsonl(f: Path) -> Iterator[Row | Rejected]:
    with open(f, "rb") as fh:
        for n, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            where = f"{f}:{n}"
            try:
                obj = json.loads(raw.decode("utf-8-sig"))
            except UnicodeDecodeError as e:
                yield Rejected(where, "", f"not valid UTF-8 ({e.reason} at byte {e.start})")
            except json.JSONDecodeError as e:
                yield Rejected(where, "", f"invalid JSON ({e.msg}, column {e.colno})")
            except RecursionError:
                yield Rejected(where, "", "invalid JSON (nested too deeply)")
            else:
                if isinstance(obj, dict):
                    yield Row(obj, where)
                else:
                    yield Rejected(where, "", f"expected a JSON object, got {type(obj).__name__}")


def _read_json(f: Path) -> Iterator[Row | Rejected]:
    try:
        obj = json.loads(f.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{f}: invalid JSON ({e})") from None
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    if not isinstance(obj, list):
        raise DataError(f"{f}: expected a JSON list of objects (or {{'data': [...]}})")
    for i, rec in enumerate(obj):
        if isinstance(rec, dict):
            yield Row(rec, f"{f}:row {i + 1}")
        else:
            yield Rejected(f"{f}:row {i + 1}", "", f"expected a JSON object, got {type(rec).__name__}")


def _read_hub(name: str, split: str, limit: int | None) -> list[Row]:
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{name!r} is not a local file or folder; to read it as a Hugging Face dataset, "
            "pip install 'strop[hub]'"
        ) from None
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # noqa: BLE001 - any hub failure is a user-facing data error
        raise DataError(f"could not load Hugging Face dataset {name!r} (split {split!r}): {e}") from None
    n = len(ds) if limit is None else min(limit, len(ds))
    return [Row(dict(ds[i]), f"{name}[{split}]:row {i + 1}") for i in range(n)]
