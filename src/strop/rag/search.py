"""Find the chunks of an index that answer a query: dense (cosine of embeddings, exact), lexical (BM25)
or hybrid, which fuses the two rankings by reciprocal rank (Cormack et al. 2009: score = sum over the
rankings of 1 / (60 + rank)), so a chunk either method ranks high comes first.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from strop.core.errors import StropError
from strop.rag.index import Index, load
from strop.rag.lexical import BM25

Mode = Literal["hybrid", "dense", "bm25"]
MODES: tuple[Mode, ...] = ("hybrid", "dense", "bm25")
RRF_K = 60
log = logging.getLogger("strop.rag")


@dataclass(frozen=True)
class Hit:
    rank: int  # from 1
    doc_id: str
    chunk: int  # the chunk's number within its document
    score: float  # cosine (dense), BM25 (bm25) or fused reciprocal rank (hybrid)
    text: str
    source: str


class Retriever:
    """An index loaded for queries; the encoder is loaded only when a mode needs it. `approximate`:
    dense hits from an HNSW graph (usearch) built over the vectors on first use, instead of the exact
    matrix product: sub-linear per query on large indexes, at a small loss of recall."""

    def __init__(self, index: Index | str | Path, embedder=None, approximate: bool = False) -> None:
        self.index = index if isinstance(index, Index) else load(index)
        self._embedder = embedder
        self._bm25: BM25 | None = None
        self.approximate = approximate
        self._ann: Any = None  # usearch.index.Index, built on first use

    @property
    def embedder(self):
        if self._embedder is None:
            from strop.rag.embed import Embedder

            self._embedder = Embedder(self.index.model)
        return self._embedder

    @property
    def bm25(self) -> BM25:
        if self._bm25 is None:
            self._bm25 = BM25([c.text for c in self.index.chunks])
        return self._bm25

    def search(self, query: str, top_k: int = 4, mode: Mode = "hybrid") -> list[Hit]:
        if mode not in MODES:
            raise StropError(f"retrieval mode {mode!r}: use one of {', '.join(MODES)}")
        if top_k < 1:
            raise StropError(f"top_k: must be at least 1, got {top_k}")
        if not self.index.chunks or not query.strip():
            return []
        if mode == "dense":
            order, scores = self._dense_top(query, top_k)
        elif mode == "bm25":
            order, scores = _ranked(self.bm25.scores(query), positive=True)
        else:
            order, scores = self._fused(query, depth=max(50, 4 * top_k))
        return [
            self._hit(rank, i, s)
            for rank, (i, s) in enumerate(zip(order[:top_k], scores[:top_k], strict=True), 1)
        ]

    def best_chunk(self, query: str, doc_id: str, mode: Mode = "hybrid") -> Hit:
        """The chunk of document `doc_id` that matches `query` best (BM25 in bm25 mode, else cosine)."""
        mine = [i for i, c in enumerate(self.index.chunks) if c.doc_id == doc_id]
        if not mine:
            raise StropError(f"document id {doc_id!r} is not in the index")
        scores = self.bm25.scores(query) if mode == "bm25" else self.dense_scores(query)
        best = max(mine, key=lambda i: (float(scores[i]), -i))
        return self._hit(1, best, float(scores[best]))

    def dense_scores(self, query: str) -> np.ndarray:
        q = self.embedder.embed([query])[0]
        return (self.index.vectors @ q).numpy()

    def _dense_top(self, query: str, depth: int) -> tuple[list[int], list[float]]:
        """The `depth` chunks nearest to the query, by cosine (exact, or from the HNSW graph)."""
        if not self.approximate:
            order, scores = _ranked(self.dense_scores(query))
            return order[:depth], scores[:depth]
        q = self.embedder.embed([query])[0].numpy()
        found = self._graph().search(q, min(depth, len(self.index.chunks)))
        return [int(k) for k in found.keys], [
            1.0 - float(d) for d in found.distances
        ]  # ip distance = 1 - cos

    def _graph(self):
        if self._ann is None:
            try:
                from usearch.index import Index as HNSW
            except ImportError:
                raise StropError("approximate search needs usearch: pip install usearch") from None
            vectors = self.index.vectors.numpy()
            log.info("building the approximate (HNSW) index over %d chunks", len(vectors))
            self._ann = HNSW(
                ndim=vectors.shape[1], metric="ip", dtype="f32", connectivity=16, expansion_search=64
            )
            # one thread: usearch's concurrent inserts build a worse graph (measured: 1.2% of top-1
            # misses on 500 random 16-d vectors vs 0 of 2000 single-threaded) that differs run to run
            self._ann.add(np.arange(len(vectors)), vectors, threads=1)
        return self._ann

    def _fused(self, query: str, depth: int) -> tuple[list[int], list[float]]:
        fused: dict[int, float] = {}
        for order, _ in (self._dense_top(query, depth), _ranked(self.bm25.scores(query), positive=True)):
            for rank, i in enumerate(order[:depth], 1):
                fused[i] = fused.get(i, 0.0) + 1.0 / (RRF_K + rank)
        best = sorted(fused, key=lambda i: (-fused[i], i))
        return best, [fused[i] for i in best]

    def _hit(self, rank: int, i: int, score: float) -> Hit:
        c = self.index.chunks[i]
        return Hit(rank, c.doc_id, c.number, float(score), c.text, self.index.documents[c.doc_id]["source"])


def _ranked(scores: np.ndarray, positive: bool = False) -> tuple[list[int], list[float]]:
    """Chunk positions by score, highest first (ties by position); `positive` drops chunks scoring 0."""
    scores = np.asarray(scores, dtype=np.float64)
    order = np.lexsort((np.arange(len(scores)), -scores))
    if positive:
        order = order[scores[order] > 0]
    return order.tolist(), scores[order].tolist()
