"""How well an index retrieves: recall@k, MRR and nDCG@k against gold documents, and the context
scores against reference answers, for each retrieval mode, over a file of questions.

A question row holds `question` (or `instruction`/`prompt`), its gold document id(s) in `doc_id`,
`doc_ids` or `gold`, and optionally the reference `answer` (or `output`) for the context scores.
"""

from __future__ import annotations

import numpy as np

from strop.core.errors import DataError
from strop.data.read import Row
from strop.rag import scores
from strop.rag.search import Mode, Retriever

QUESTION_FIELDS = ("question", "instruction", "prompt")
ANSWER_FIELDS = ("answer", "output", "response")
GOLD_FIELDS = ("doc_id", "doc_ids", "gold")


def question_of(row: Row) -> str:
    key = next((k for k in QUESTION_FIELDS if isinstance(row.data.get(k), str) and row.data[k].strip()), None)
    if key is None:
        raise DataError(f"{row.where}: no question (a non-empty {', '.join(QUESTION_FIELDS)} field)")
    return row.data[key].strip()


def answer_of(row: Row) -> str | None:
    return next((row.data[k] for k in ANSWER_FIELDS if isinstance(row.data.get(k), str)), None)


def gold_of(row: Row) -> set[str]:
    for key in GOLD_FIELDS:
        value = row.data.get(key)
        if isinstance(value, str | int):
            return {str(value)}
        if isinstance(value, list) and value and all(isinstance(v, str | int) for v in value):
            return {str(v) for v in value}
        if value is not None:
            raise DataError(f"{row.where}: field {key!r}: expected a document id or a list of them")
    return set()


def evaluate_retrieval(retriever: Retriever, rows: list[Row], ks: list[int], modes: list[Mode]) -> dict:
    """{mode: {metric: mean}} plus the number of questions scored for each kind of metric."""
    if not rows:
        raise DataError("no question rows to score retrieval on (an empty file?)")
    questions = [question_of(r) for r in rows]
    golds = [gold_of(r) for r in rows]
    answers = [answer_of(r) for r in rows]
    with_gold = [i for i, g in enumerate(golds) if g]
    with_answer = [i for i, a in enumerate(answers) if a]
    if not with_gold and not with_answer:
        raise DataError(
            f"{rows[0].where.rsplit(':', 1)[0]}: no row has gold documents ({', '.join(GOLD_FIELDS)}) "
            f"or a reference answer ({', '.join(ANSWER_FIELDS)}) to score retrieval against"
        )
    depth = max(ks)
    out: dict = {
        "questions": len(rows),
        "with_gold": len(with_gold),
        "with_answer": len(with_answer),
        "modes": {},
    }
    for mode in modes:
        per: dict[str, list[float]] = {}
        for i, q in enumerate(questions):
            hits = retriever.search(q, top_k=depth, mode=mode)
            ranked = [h.doc_id for h in hits]  # by chunk, as --rag --top-k K passes them on
            if golds[i]:
                for k in ks:
                    per.setdefault(f"recall@{k}", []).append(scores.recall_at_k(ranked, golds[i], k))
                    per.setdefault(f"ndcg@{k}", []).append(scores.ndcg_at_k(ranked, golds[i], k))
                per.setdefault("mrr", []).append(scores.reciprocal_rank(ranked, golds[i]))
            answer = answers[i]
            if answer:
                k = min(ks)
                texts = [h.text for h in hits[:k]]
                per.setdefault(f"context_recall@{k}", []).append(scores.context_recall(texts, answer))
                per.setdefault(f"context_precision@{k}", []).append(scores.context_precision(texts, answer))
        out["modes"][mode] = {name: float(np.mean(v)) for name, v in per.items()}
    return out
