"""Retrieval-augmented fine-tuning rows (RAFT, Zhang et al. 2024): each question is shown with passages
as `--rag` will show them, so the tuned model learns to use the right passage and to ignore the rest.

For a fraction P of the rows (chosen by the seed, exactly round(P * rows)) the passages are the oracle
plus K distractors; for the others, K distractors only, so the model also learns to answer
when retrieval missed. Distractors are the index's best hits for the question that do not come from the
oracle document (by its id in the index, or by equal text), topped up with random chunks of other
documents when retrieval finds too few. The oracle is the row's document text, or,
when the row's `doc_id` names a document of the index, that document's chunk that best matches the
question (so the oracle is as long as any passage and the prompt looks like inference's). Passages are shuffled, so the oracle's
position teaches nothing. Rows are chat rows, trained with loss on the answer only.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from strop.core.errors import DataError
from strop.data.read import Row
from strop.rag.prompt import with_context
from strop.rag.search import Mode, Retriever


@dataclass(frozen=True)
class Passage:
    doc_id: str
    text: str


FIELDS = {"question": ("question", "instruction", "prompt"), "answer": ("answer", "output", "response")}
DOCUMENT_FIELDS = ("document", "context", "passage", "oracle")


def _field(row: Row, names: tuple[str, ...], what: str, given: str | None) -> str:
    key = given or next((k for k in names if k in row.data), None)
    if key is None or key not in row.data:
        raise DataError(f"{row.where}: no {what} field ({given or ' or '.join(names)})")
    value = row.data[key]
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{row.where}: field {key!r}: expected non-empty text")
    return value.strip()


def raft_rows(
    rows: list[Row],
    retriever: Retriever,
    oracle_fraction: float,
    distractors: int,
    seed: int = 0,
    mode: Mode = "hybrid",
    document_field: str | None = None,
) -> list[dict]:
    if not 0 <= oracle_fraction <= 1:
        raise DataError(f"--oracle-fraction: must be in [0, 1], got {oracle_fraction}")
    if distractors < 0:
        raise DataError(f"--distractors: must be at least 0, got {distractors}")
    rng = random.Random(seed)
    with_oracle = set(rng.sample(range(len(rows)), round(oracle_fraction * len(rows))))
    out = []
    for i, row in enumerate(rows):
        question = _field(row, FIELDS["question"], "question", None)
        answer = _field(row, FIELDS["answer"], "answer", None)
        oracle_id = str(row.data.get("doc_id") or row.data.get("id") or f"oracle-{i}")
        if oracle_id in retriever.index.documents and not document_field:
            document = retriever.best_chunk(question, oracle_id, mode).text  # as long as any passage
        else:
            document = _field(row, DOCUMENT_FIELDS, "document", document_field)
        passages = _distractors(retriever, question, document, oracle_id, distractors, mode, rng)
        if i in with_oracle:
            passages.append(Passage(oracle_id, document))
        rng.shuffle(passages)
        out.append(
            {
                "messages": [
                    {"role": "user", "content": with_context(question, passages)},
                    {"role": "assistant", "content": answer},
                ],
                "raft": {
                    "oracle": i in with_oracle,
                    "passages": [p.doc_id for p in passages],
                    "source": row.where,
                },
            }
        )
    return out


def _distractors(
    retriever: Retriever, question: str, document: str, oracle_id: str, k: int, mode, rng: random.Random
) -> list[Passage]:
    if k == 0:
        return []
    oracle_text = " ".join(document.split())
    picked: list[Passage] = []
    spare = retriever.index.documents.get(oracle_id, {}).get("chunks", 0) + 4  # hits of the oracle itself
    for hit in retriever.search(question, top_k=k + spare, mode=mode):
        text = " ".join(hit.text.split())
        if hit.doc_id == oracle_id or text in oracle_text or oracle_text in text:
            continue
        picked.append(Passage(hit.doc_id, hit.text))
        if len(picked) == k:
            return picked
    # retrieval ran short (BM25 finds no other chunk sharing a word): random chunks of other documents
    others = [
        c for c in retriever.index.chunks if c.doc_id != oracle_id and Passage(c.doc_id, c.text) not in picked
    ]
    picked += [Passage(c.doc_id, c.text) for c in rng.sample(others, min(k - len(picked), len(others)))]
    return picked
