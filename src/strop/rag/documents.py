"""Documents for an index: text, Markdown, HTML files, or rows of JSONL/JSON/CSV/Parquet files.

A document is an id, its text and where it came from. A file is one document whose id is its path; a
row is one document whose id is its `id_field` value when it has one, else `path:line`. Folders are
walked for the suffixes below, sorted so the same folder always gives the same documents.
"""

from __future__ import annotations

import hashlib
import html.parser
import re
from dataclasses import dataclass
from pathlib import Path

from strop.core.errors import DataError
from strop.core.io import unreadable_file
from strop.data.read import SUFFIXES as ROW_SUFFIXES
from strop.data.read import read_rows

TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".rst", ".text"}
HTML_SUFFIXES = {".html", ".htm"}
SUFFIXES = TEXT_SUFFIXES | HTML_SUFFIXES | ROW_SUFFIXES
TEXT_FIELDS = ("text", "document", "content", "context", "passage", "body")


@dataclass(frozen=True)
class Document:
    id: str
    text: str
    source: str  # "path" or "path:line"

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


def read_documents(paths: list[str], text_field: str | None = None, id_field: str = "id") -> list[Document]:
    """Every document in `paths` (files or folders). Two documents with one id are an error naming both."""
    docs: list[Document] = []
    seen: dict[str, str] = {}
    for path in paths:
        for f in _files(path):
            for doc in _read(f, text_field, id_field):
                if doc.id in seen:
                    raise DataError(
                        f"{doc.source}: document id {doc.id!r} is also the id of {seen[doc.id]}; ids must be unique"
                    )
                seen[doc.id] = doc.source
                docs.append(doc)
    if not docs:
        raise DataError(f"no documents in {', '.join(paths)} (give {'/'.join(sorted(SUFFIXES))} files)")
    return docs


def _files(path: str) -> list[Path]:
    p = Path(path).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SUFFIXES)
        if not files:
            raise DataError(f"{p}: folder holds no {'/'.join(sorted(SUFFIXES))} files")
        return files
    if not p.is_file():
        why = unreadable_file(p)
        raise DataError(f"document file not found: {p}" if why in (None, "not found") else f"{p}: {why}")
    if p.suffix.lower() not in SUFFIXES:
        raise DataError(f"{p}: unsupported document type {p.suffix!r} (use {', '.join(sorted(SUFFIXES))})")
    return [p]


def _read(f: Path, text_field: str | None, id_field: str) -> list[Document]:
    suffix = f.suffix.lower()
    if suffix in ROW_SUFFIXES:
        return _rows(f, text_field, id_field)
    try:
        raw = f.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = e.object.count(b"\n", 0, e.start) + 1
        raise DataError(f"{f}:{line}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    text = html_text(raw) if suffix in HTML_SUFFIXES else raw.replace("\r\n", "\n")
    if not text.strip():
        return []
    return [Document(f.as_posix(), text.strip(), f.as_posix())]


def _rows(f: Path, text_field: str | None, id_field: str) -> list[Document]:
    docs = []
    for row in read_rows(str(f)):
        field = text_field or next((k for k in TEXT_FIELDS if k in row.data), None)
        if field is None or field not in row.data:
            wanted = repr(text_field) if text_field else f"one of {', '.join(TEXT_FIELDS)}"
            raise DataError(
                f"{row.where}: no text field {wanted} (fields: {', '.join(map(str, row.data)) or 'none'}); "
                "name it with --text-field"
            )
        text = row.data[field]
        if not isinstance(text, str):
            raise DataError(f"{row.where}: field {field!r}: expected text, got {type(text).__name__}")
        if not text.strip():
            continue
        key = row.data.get(id_field)
        if key is not None and not isinstance(key, str | int):
            raise DataError(f"{row.where}: field {id_field!r}: expected a string or number as document id")
        docs.append(Document(str(key) if key is not None else row.where, text.strip(), row.where))
    return docs


class _HTMLText(html.parser.HTMLParser):
    """Visible text of a page; block elements end paragraphs, scripts and styles are dropped."""

    BLOCKS = {"p", "div", "section", "article", "li", "ul", "ol", "br", "tr", "table", "pre", "blockquote"}
    BLOCKS |= {f"h{i}" for i in range(1, 7)}
    HIDDEN = {"script", "style", "head", "noscript", "template", "svg"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.hidden = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.HIDDEN:
            self.hidden += 1
        elif tag in self.BLOCKS:
            self.parts.append("\n\n")

    def handle_endtag(self, tag):
        if tag in self.HIDDEN:
            self.hidden = max(0, self.hidden - 1)
        elif tag in self.BLOCKS:
            self.parts.append("\n\n")

    def handle_data(self, data):
        if not self.hidden:
            self.parts.append(data)


def html_text(raw: str) -> str:
    parser = _HTMLText()
    parser.feed(raw)
    parser.close()
    paragraphs = (re.sub(r"\s+", " ", p).strip() for p in "".join(parser.parts).split("\n\n"))
    return "\n\n".join(p for p in paragraphs if p)
