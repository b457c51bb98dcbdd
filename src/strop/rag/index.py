"""A retrieval index on disk: chunks, their embeddings, and the documents they came from.

    INDEX/index.json              model, chunking, and each document's digest, source and chunk count
    INDEX/chunks.jsonl            one chunk per line: doc_id, number, start, end, tokens, text
    INDEX/embeddings.safetensors  "embeddings": [chunks, dim] float32 unit vectors, in chunks.jsonl order

Adding, updating and removing documents rewrites the folder atomically (the old index stays whole until
the new one is in place) and embeds only chunks whose text is new: an unchanged document keeps its
vectors, and a changed one re-uses the vectors of every chunk whose text did not change.

Concurrency: a change is read, made and saved under `locked(INDEX)` (a lock file beside the folder,
since the folder itself is replaced by each save), so two updates at once both land, one after the
other. `load` reads one whole version: its three files are opened through one handle on the folder,
so a save landing meanwhile is seen entirely or not at all.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from strop.core.errors import StropError
from strop.core.io import atomic_dir, exclusive
from strop.rag.chunk import Chunk, chunk_text
from strop.rag.documents import Document

FORMAT = 1
FILES = ("index.json", "chunks.jsonl", "embeddings.safetensors")
LOCK_TIMEOUT = 3600.0  # s an update waits for another one (embedding a large corpus takes minutes)


@dataclass
class Index:
    model: str
    size: int  # tokens per chunk at most
    overlap: int
    documents: dict[str, dict] = field(default_factory=dict)  # id -> {digest, source, chunks}
    chunks: list[Chunk] = field(default_factory=list)
    vectors: torch.Tensor = field(default_factory=lambda: torch.empty(0, 0))
    seconds: float = 0.0  # time spent chunking and embedding, over every update of the index

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])


@dataclass
class Changes:
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    embedded: int = 0  # chunks embedded now
    reused: int = 0  # chunks whose vectors were kept
    seconds: float = 0.0

    def summary(self) -> str:
        return (
            f"{len(self.added)} added, {len(self.updated)} updated, {len(self.unchanged)} unchanged, "
            f"{len(self.removed)} removed; {self.embedded} chunks embedded, {self.reused} reused"
        )


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def lock_path(folder: str | Path) -> Path:
    """`.NAME.lock` beside the index folder `NAME`: each save replaces the folder, never this file."""
    d = Path(folder).expanduser().resolve()
    return d.with_name(f".{d.name}.lock")


@contextmanager
def locked(folder: str | Path, timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
    """Hold the index's update lock: wrap the load, the change and the save of one update in it."""
    lock = lock_path(folder)
    if not lock.parent.is_dir():
        raise StropError(f"{folder}: not a strop index (no such folder)")
    with exclusive(lock, str(folder), timeout):
        yield


def load(folder: str | Path) -> Index:
    """The index in `folder`, as one version of it (see the module docstring). A missing, foreign or
    damaged index (a file cut short, a wrong field) is a StropError naming the folder."""
    texts = _read_version(Path(folder).expanduser(), str(folder))
    try:
        meta = json.loads(texts["index.json"])
        chunks = [Chunk(**json.loads(line)) for line in texts["chunks.jsonl"].decode().splitlines() if line]
        vectors = load_safetensors(texts["embeddings.safetensors"])["embeddings"]
        if meta.get("format") != FORMAT:
            raise StropError(
                f"{folder}: index format {meta.get('format')!r}; this strop reads format {FORMAT}"
            )
        index = Index(
            meta["model"],
            meta["chunk_size"],
            meta["chunk_overlap"],
            meta["documents"],
            chunks,
            vectors,
            float(meta.get("seconds", 0.0)),
        )
    except (ValueError, TypeError, KeyError, AttributeError, SafetensorError) as e:
        raise StropError(
            f"{folder}: the index is damaged ({type(e).__name__}: {str(e)[:200]}); build it again"
        ) from None
    if vectors.ndim != 2:
        raise StropError(
            f"{folder}: the index is damaged (embeddings of shape {list(vectors.shape)}); build it again"
        )
    if len(chunks) != vectors.shape[0]:
        raise StropError(f"{folder}: {len(chunks)} chunks but {vectors.shape[0]} vectors; build it again")
    return index


def _read_version(d: Path, name: str, attempts: int = 20) -> dict[str, bytes]:
    """The bytes of FILES, all from one version of the folder: opened relative to one handle on it, so
    a save replacing the folder meanwhile cannot mix versions. A read that a save got in the way of
    (the folder moved aside for a moment, the old version removed before its files were opened) is
    tried again."""
    for attempt in range(attempts):
        handles: list[int] = []
        try:
            dfd = os.open(d, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
            try:
                for f in FILES:
                    handles.append(os.open(f, os.O_RDONLY, dir_fd=dfd))
            finally:
                os.close(dfd)
            out = {}
            for f, fd in zip(FILES, handles, strict=True):
                with open(fd, "rb", closefd=False) as fh:
                    out[f] = fh.read()
            return out
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            if attempt == attempts - 1 or not (_mid_save(d) or all((d / f).is_file() for f in FILES)):
                break
            time.sleep(0.05)
        finally:
            for fd in handles:
                os.close(fd)
    missing = [f for f in FILES if not (d / f).is_file()]
    what = "no such folder" if not d.is_dir() else f"no {missing[0] if missing else FILES[0]} there"
    raise StropError(f"{name}: not a strop index ({what}; build one with `strop rag index`)")


def _mid_save(d: Path) -> bool:
    """Whether a save of `d` is under way (`atomic_dir`'s temporary or old sibling exists)."""
    d = d.resolve()
    pattern = glob.escape(f".{d.name}")
    return d.parent.is_dir() and any(any(d.parent.glob(f"{pattern}.{kind}-*")) for kind in ("tmp", "old"))


def save(index: Index, folder: str | Path) -> None:
    def fill(tmp: Path) -> None:
        save_file({"embeddings": index.vectors.contiguous()}, tmp / "embeddings.safetensors")
        with open(tmp / "chunks.jsonl", "w", encoding="utf-8") as f:
            for c in index.chunks:
                f.write(json.dumps(asdict(c), ensure_ascii=False) + "\n")
        meta = {
            "format": FORMAT,
            "model": index.model,
            "dim": index.dim,
            "chunk_size": index.size,
            "chunk_overlap": index.overlap,
            "chunks": len(index.chunks),
            "documents": index.documents,
            "seconds": round(index.seconds, 3),
            "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (tmp / "index.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")

    atomic_dir(Path(folder).expanduser().absolute(), fill)  # "." has no name to put a sibling beside


def update(
    index: Index, docs: list[Document], embedder, sync: bool = False, progress: bool = False
) -> Changes:
    """Add new documents, re-chunk changed ones (by digest), keep the rest; `sync` also removes the
    documents of the index that are not in `docs`. Only chunk texts the index has no vector for are embedded."""
    t0 = time.time()
    changes = Changes()
    known = {_digest(c.text): index.vectors[i] for i, c in enumerate(index.chunks)}
    by_doc: dict[str, list[int]] = {}
    for i, c in enumerate(index.chunks):
        by_doc.setdefault(c.doc_id, []).append(i)
    given = {d.id for d in docs}
    documents: dict[str, dict] = {}
    chunks: list[Chunk] = []
    rows: list[torch.Tensor | None] = []
    for doc_id, meta in index.documents.items():  # the index's own order first, then new documents
        if doc_id not in given:
            if sync:
                changes.removed.append(doc_id)
                continue
            documents[doc_id] = meta
            chunks += [index.chunks[i] for i in by_doc.get(doc_id, [])]
            rows += [index.vectors[i] for i in by_doc.get(doc_id, [])]
    for doc in docs:
        old = index.documents.get(doc.id)
        if old is not None and old["digest"] == doc.digest:
            changes.unchanged.append(doc.id)
            new_chunks = [index.chunks[i] for i in by_doc.get(doc.id, [])]
        else:
            (changes.updated if old is not None else changes.added).append(doc.id)
            new_chunks = chunk_text(
                doc.id, doc.text, index.size, index.overlap, embedder.count, embedder.windows
            )
        documents[doc.id] = {"digest": doc.digest, "source": doc.source, "chunks": len(new_chunks)}
        chunks += new_chunks
        rows += [known.get(_digest(c.text)) for c in new_chunks]
    todo = [i for i, r in enumerate(rows) if r is None]
    fresh = embedder.embed([chunks[i].text for i in todo], progress=progress) if todo else None
    for k, i in enumerate(todo):
        rows[i] = fresh[k]  # type: ignore[index]
    changes.embedded, changes.reused = len(todo), len(rows) - len(todo)
    index.vectors = torch.stack(rows) if rows else torch.empty(0, embedder.dim)  # type: ignore[arg-type]
    index.documents, index.chunks = documents, chunks
    changes.seconds = time.time() - t0
    index.seconds += changes.seconds
    return changes


def remove(index: Index, ids: list[str]) -> list[str]:
    """Drop documents by id; an id the index does not hold is an error naming it (nothing is removed)."""
    unknown = [i for i in ids if i not in index.documents]
    if unknown:
        near = ", ".join(list(index.documents)[:5])
        raise StropError(f"document id {unknown[0]!r} is not in the index (ids look like: {near})")
    drop = set(ids)
    keep = [i for i, c in enumerate(index.chunks) if c.doc_id not in drop]
    index.chunks = [index.chunks[i] for i in keep]
    index.vectors = index.vectors[keep] if keep else torch.empty(0, index.dim)
    index.documents = {k: v for k, v in index.documents.items() if k not in drop}
    return ids
