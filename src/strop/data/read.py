"""Read rows from JSONL, JSON, CSV, Parquet, a folder of them, or a Hugging Face dataset.

Each row keeps where it came from (`file:line`) so any later error can point at it. A row larger than
`max_row_bytes` (`data.max_row_bytes`) is rejected by `file:line` with its size: a JSONL line is
measured while it is read, in bounded memory and before it is parsed; a row of another file by the
UTF-8 bytes of its keys and strings once parsed (CSV fields are capped while parsing).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from strop.core.data_config import MAX_ROW_BYTES, DatasetSource
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
    path: str,
    split: str = "train",
    limit: int | None = None,
    rejected: list[Rejected] | None = None,
    max_row_bytes: int = MAX_ROW_BYTES,
) -> list[Row]:
    """All rows of a file, a folder of files, or a Hugging Face dataset name.

    A row that cannot be parsed (invalid JSON or UTF-8, not an object, too many CSV values) or is larger
    than `max_row_bytes` stops the read with an error naming its line, unless `rejected` is given: then
    it is appended there and skipped.
    """
    return list(iter_rows(path, split, limit, rejected, max_row_bytes))


def iter_rows(
    path: str,
    split: str = "train",
    limit: int | None = None,
    rejected: list[Rejected] | None = None,
    max_row_bytes: int = MAX_ROW_BYTES,
) -> Iterator[Row]:
    """`read_rows` as a stream: one row in memory at a time (a JSON file is parsed whole). A missing
    file is an error before the first row."""
    files = _files(path)
    if files is None:
        yield from _read_hub(path, split, limit, max_row_bytes, rejected)
        return
    n = 0
    for f in files:
        for row in _read_file(f, max_row_bytes):
            if isinstance(row, Rejected):
                if rejected is None:
                    raise DataError(str(row))
                rejected.append(row)
                continue
            yield row
            n += 1
            if limit and n >= limit:
                return


def check_sources(sources: Iterable[DatasetSource]) -> None:
    """Every local file the sources name is there: a mistyped path is said before a model is loaded (or
    a packaged GGUF converted, a minute the first time), not after."""
    for source in sources:
        _files(source.path)


def _files(path: str) -> list[Path] | None:
    """The data files at `path`; None when it names a Hugging Face dataset."""
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
        return None
    return files


def _read_file(f: Path, max_row_bytes: int) -> Iterator[Row | Rejected]:
    if f.suffix not in SUFFIXES:
        raise DataError(f"{f}: unsupported file type {f.suffix!r} (use .jsonl, .json, .csv or .parquet)")
    if f.suffix == ".jsonl":
        yield from _read_jsonl(f, max_row_bytes)
    elif f.suffix == ".json":
        yield from (sized(r, max_row_bytes) for r in _read_json(f))
    elif f.suffix == ".csv":
        yield from (sized(r, max_row_bytes) for r in _read_csv(f, max_row_bytes))
    else:
        import pyarrow.parquet as pq

        n = 0
        for batch in pq.ParquetFile(f).iter_batches(batch_size=4096):  # never the whole table as objects
            for rec in batch.to_pylist():
                n += 1
                yield sized(Row(rec, f"{f}:row {n}"), max_row_bytes)


def too_large(where: str, size: int, max_row_bytes: int) -> Rejected:
    return Rejected(
        where,
        "",
        f"row of {size:,} bytes is larger than data.max_row_bytes ({max_row_bytes:,}); "
        "raise data.max_row_bytes to read it",
    )


def sized(row: Row | Rejected, max_row_bytes: int) -> Row | Rejected:
    """`row`, or its rejection when the UTF-8 bytes of its keys and strings exceed `max_row_bytes`."""
    if isinstance(row, Rejected):
        return row
    size, stack = 0, [row.data]
    while stack:
        x = stack.pop()
        if isinstance(x, str):
            size += len(x) if x.isascii() else len(x.encode("utf-8", "surrogatepass"))
        elif isinstance(x, dict):
            stack += [*x.keys(), *x.values()]
        elif isinstance(x, (list, tuple)):
            stack += x
    return too_large(row.where, size, max_row_bytes) if size > max_row_bytes else row


def _read_csv(f: Path, max_row_bytes: int) -> Iterator[Row | Rejected]:
    old_limit = csv.field_size_limit(max_row_bytes)  # the parser stops at a longer field
    try:
        with open(f, encoding="utf-8-sig", newline="") as fh:  # -sig: Excel's "CSV UTF-8" starts with a BOM
            reader = csv.DictReader(fh)
            line = 0
            while True:
                try:
                    rec = next(reader)
                except StopIteration:
                    return
                except csv.Error as e:  # e.g. a field over the limit: the parser goes on at the next line
                    why = (
                        f"a field is larger than data.max_row_bytes ({max_row_bytes:,} bytes); raise it to read it"
                        if "field limit" in str(e)
                        else f"unreadable CSV ({e})"
                    )
                    yield Rejected(f"{f}:{line + 1}", "", why)
                    line = reader.line_num
                    continue
                except UnicodeDecodeError:
                    raise _csv_utf8_error(f) from None
                where, line = f"{f}:{reader.line_num}", reader.line_num
                if None in rec:  # csv puts values beyond the header under the key None
                    yield Rejected(
                        where, "", f"more values than the {len(reader.fieldnames or ())} header columns"
                    )
                else:
                    yield Row(dict(rec), where)
    finally:
        csv.field_size_limit(old_limit)


def _csv_utf8_error(f: Path) -> DataError:
    """The line and byte of a CSV file's first invalid UTF-8 (read again whole: only on this error)."""
    try:
        f.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = e.object.count(b"\n", 0, e.start) + 1
        return DataError(f"{f}:{line}: not valid UTF-8 ({e.reason} at byte {e.start})")
    return DataError(f"{f}: not valid UTF-8")


def _read_jsonl(f: Path, max_row_bytes: int) -> Iterator[Row | Rejected]:
    with open(f, "rb") as fh:
        n = 0
        while raw := fh.readline(max_row_bytes + 2):  # + 2: the line's own "\r\n"
            n += 1
            where = f"{f}:{n}"
            if len(raw.rstrip(b"\r\n")) > max_row_bytes:  # measure the rest of the line, never hold it
                size = len(raw)
                while not raw.endswith(b"\n") and (raw := fh.readline(1 << 20)):
                    size += len(raw)
                newline = 2 if raw.endswith(b"\r\n") else 1 if raw.endswith(b"\n") else 0
                yield too_large(where, size - newline, max_row_bytes)
                continue
            if not raw.strip():
                continue
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


def _read_hub(
    name: str, split: str, limit: int | None, max_row_bytes: int, rejected: list[Rejected] | None
) -> Iterator[Row]:
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
    n = 0
    for i in range(len(ds)):
        if limit is not None and n >= limit:
            break
        row = sized(Row(dict(ds[i]), f"{name}[{split}]:row {i + 1}"), max_row_bytes)
        if isinstance(row, Rejected):
            if rejected is None:
                raise DataError(str(row))
            rejected.append(row)
        else:
            n += 1
            yield row
