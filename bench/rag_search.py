"""Exact vs approximate (HNSW, usearch) dense search as strop's Retriever runs them, on synthetic unit
vectors of MiniLM's size: per-query latency, graph build time, and recall@10 of the approximate hits.

    python bench/rag_search.py                 # 10k, 100k and 300k chunks (~2 min on 2 cores)
    python bench/rag_search.py --sizes 50000
"""

from __future__ import annotations

import argparse
import time

import torch

from strop.rag.chunk import Chunk
from strop.rag.index import Index
from strop.rag.search import Retriever


class Fixed:
    """Query "i" is the i-th query vector: the encoder's cost is left out, both paths pay it alike."""

    def __init__(self, queries: torch.Tensor) -> None:
        self.queries = queries

    def embed(self, texts):
        return self.queries[[int(t) for t in texts]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="10000,100000,300000")
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--queries", type=int, default=200)
    args = p.parse_args()
    print(
        "| chunks | exact ms/query | HNSW ms/query | speed-up | HNSW build s | recall@10 |\n|---|---|---|---|---|---|"
    )
    for n in (int(s) for s in args.sizes.split(",")):
        gen = torch.Generator().manual_seed(0)
        vectors = torch.nn.functional.normalize(torch.randn(n, args.dim, generator=gen), dim=1)
        # queries near stored vectors, as real questions are near their passages
        anchors = vectors[torch.randint(0, n, (args.queries,), generator=gen)]
        queries = torch.nn.functional.normalize(
            anchors + 0.8 * torch.randn(anchors.shape, generator=gen) / args.dim**0.5, dim=1
        )
        chunks = [Chunk(f"d{i}", 0, 0, 1, "", 1) for i in range(n)]
        index = Index("synthetic", 200, 0, {f"d{i}": {"source": ""} for i in range(n)}, chunks, vectors)
        exact = Retriever(index, Fixed(queries))
        approx = Retriever(index, Fixed(queries), approximate=True)
        t = time.perf_counter()
        approx._graph()
        build = time.perf_counter() - t
        timings, recall = {}, []
        for name, r in (("exact", exact), ("approx", approx)):
            t = time.perf_counter()
            hits = [r.search(str(i), top_k=10, mode="dense") for i in range(args.queries)]
            timings[name] = 1000 * (time.perf_counter() - t) / args.queries
            if name == "exact":
                truth = [{h.doc_id for h in hs} for hs in hits]
            else:
                recall = [len(truth[i] & {h.doc_id for h in hs}) / 10 for i, hs in enumerate(hits)]
        print(
            f"| {n:,} | {timings['exact']:.2f} | {timings['approx']:.2f} | {timings['exact'] / timings['approx']:.1f}x "
            f"| {build:.1f} | {sum(recall) / len(recall):.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
