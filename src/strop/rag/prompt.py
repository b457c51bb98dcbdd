"""The user turn a retrieval-augmented model answers: numbered passages with their document ids, then
the question. Inference (`--rag`) and retrieval-augmented training rows (RAFT) both build it here, so a
model is tuned on exactly the prompts it later sees; the chat template renders it like any user turn.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

INSTRUCTION = "Answer the question. Use the context where it helps; it may hold passages that do not."


class Passage(Protocol):
    @property
    def doc_id(self) -> str: ...

    @property
    def text(self) -> str: ...


def with_context(question: str, passages: Sequence[Passage]) -> str:
    if not passages:
        return question
    lines = [INSTRUCTION, "", "Context:"]
    lines += [f"[{n}] ({p.doc_id}) {' '.join(p.text.split())}" for n, p in enumerate(passages, 1)]
    return "\n".join(lines) + f"\n\nQuestion: {question}"


def augment(messages: list[dict], passages: Sequence[Passage]) -> list[dict]:
    """`messages` with the last user turn's text replaced by the question with its context."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
    if last is None:
        return messages
    out = [dict(m) for m in messages]
    out[last]["content"] = with_context(out[last]["content"], passages)
    return out


def sources(hits) -> list[dict]:
    """What a reply is returned with: each passage's document id, chunk number and score."""
    return [{"doc_id": h.doc_id, "chunk": h.chunk, "score": round(h.score, 6)} for h in hits]


def augment_examples(examples: list, retriever, top_k: int, mode) -> tuple[list, list[dict]]:
    """Evaluation examples (eval/examples.EvalExample) whose last user turn carries its passages, and
    one {id, question, sources} row per example."""
    from dataclasses import replace

    out, rows = [], []
    for ex in examples:
        question = next((m["content"] for m in reversed(ex.prompt) if m["role"] == "user"), "")
        hits = retriever.search(question, top_k, mode) if question else []
        out.append(replace(ex, prompt=tuple(augment(list(ex.prompt), hits))))
        rows.append({"id": ex.id, "question": question, "sources": sources(hits)})
    return out, rows
