"""BM25 over chunk texts with bm25s, Lucene's variant: a chunk's score for a query is the sum over the
query's terms of idf * tf / (tf + k1 * (1 - b + b * length / mean length)), with
idf = ln(1 + (N - df + 0.5) / (df + 0.5)); English stopwords dropped, lower-cased words of 2+ characters.

Built from the chunk texts when an index is loaded (milliseconds per thousand chunks), so adding or
removing documents never leaves a stale lexical index behind and nothing but text is stored for it.
"""

from __future__ import annotations

import logging

import numpy as np

K1, B = 1.5, 0.75


def _bm25s():
    import bm25s

    logging.getLogger("bm25s").setLevel(logging.WARNING)  # bm25s sets DEBUG on import: "Building index..."
    return bm25s


def terms(texts: list[str]) -> list[list[str]]:
    return _bm25s().tokenize(texts, lower=True, stopwords="en", return_ids=False, show_progress=False)


class BM25:
    def __init__(self, texts: list[str]) -> None:
        self.size = len(texts)
        self.retriever = _bm25s().BM25(k1=K1, b=B, method="lucene")
        if texts:
            self.retriever.index(terms(texts), show_progress=False)

    def scores(self, query: str) -> np.ndarray:
        """One score per chunk (0 where no query term occurs)."""
        if not self.size:
            return np.zeros(0, dtype=np.float32)
        words = terms([query])[0]
        vocab = self.retriever.vocab_dict
        known = [w for w in words if w in vocab]
        if not known:
            return np.zeros(self.size, dtype=np.float32)
        return np.asarray(self.retriever.get_scores(known), dtype=np.float32)
