"""Fine-tune, RAG, or both? The same held-out questions answered by each arm, scored without a judge.

Arms: the base model alone and with retrieval; a fine-tuned run alone and with retrieval; a RAFT run
with retrieval. Every answer is greedy. Each arm's scores (token F1, exact match, ROUGE-L, embedding
cosine to the reference) come with the paired-bootstrap interval of its difference to the base model
(eval/bootstrap), and its cost: training time, index time, prompt and answer tokens, seconds per answer.
The verdict names the best arm on the primary metric and says whether retrieval and tuning each helped.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from strop.core.errors import StropError
from strop.data.read import Row
from strop.eval.bootstrap import paired_bootstrap
from strop.eval.metrics import Metric, build_metrics
from strop.rag import scores
from strop.rag.prompt import augment, sources
from strop.rag.retrieval_eval import answer_of, gold_of, question_of
from strop.rag.search import Mode, Retriever

METRICS = ("token_f1", "exact_match", "rouge_l", "embedding")


@dataclass
class Arm:
    name: str
    target: str
    rag: bool
    train_seconds: float | None = None
    answers: list[str] = field(default_factory=list)
    prompt_tokens: float = 0.0
    answer_tokens: float = 0.0
    seconds: float = 0.0


def arms(base: str, tuned: str | None, raft: str | None) -> list[Arm]:
    out = [Arm("base", base, False), Arm("base + RAG", base, True)]
    if tuned:
        t = _train_seconds(tuned)
        out += [Arm("fine-tuned", tuned, False, t), Arm("fine-tuned + RAG", tuned, True, t)]
    if raft:
        out.append(Arm("RAFT + RAG", raft, True, _train_seconds(raft)))
    return out


def _train_seconds(run: str) -> float | None:
    result = Path(run) / "result.json"
    if not (Path(run) / "config.yaml").is_file():
        raise StropError(f"{run}: not a strop run directory (no config.yaml); give the RUN_DIR of a training")
    try:
        return float(json.loads(result.read_text())["seconds"])
    except (OSError, ValueError, KeyError):
        return None  # a run without its result (stopped early) still answers; its cost is unknown


def compare(
    rows: list[Row],
    retriever: Retriever,
    arm_list: list[Arm],
    top_k: int,
    mode: Mode,
    max_new_tokens: int,
    batch_size: int,
    device: str = "cpu",
    primary: str = "token_f1",
) -> dict:
    from strop.models.generate import generate
    from strop.models.inference import load_for_inference

    questions = [question_of(r) for r in rows]
    refs = []
    for r in rows:
        a = answer_of(r)
        if not a:
            raise StropError(f"{r.where}: no reference answer (an answer, output or response field)")
        refs.append(a)
    retriever.search(questions[0], top_k=top_k, mode=mode)  # loads the encoder and BM25 outside the timing
    t0 = time.time()
    hits = [retriever.search(q, top_k=top_k, mode=mode) for q in questions]
    retrieval_seconds = time.time() - t0
    loaded: dict = {}
    for arm in arm_list:
        if arm.target not in loaded:
            loaded = {arm.target: load_for_inference(arm.target, device)}  # one model in memory at a time
        lm = loaded[arm.target]
        conversations = [
            augment([{"role": "user", "content": q}], h if arm.rag else [])
            for q, h in zip(questions, hits, strict=True)
        ]
        t = time.time()
        arm.answers = generate(lm.model, lm.template, conversations, max_new_tokens, 0.0, 1.0, batch_size)
        arm.seconds = (time.time() - t) / len(questions)
        arm.prompt_tokens = sum(len(lm.template.prompt_ids(c)) for c in conversations) / len(conversations)
        arm.answer_tokens = sum(
            len(lm.template.tokenizer(a, add_special_tokens=False)["input_ids"]) for a in arm.answers
        ) / len(arm.answers)
    metrics = _metrics(retriever, refs, [a.answers for a in arm_list])
    base = arm_list[0]
    table = []
    for arm in arm_list:
        entry = {
            "arm": arm.name,
            "target": arm.target,
            "rag": arm.rag,
            "scores": {m.name: m.score(arm.answers, refs) for m in metrics},
            "vs_base": {}
            if arm is base
            else {m.name: paired_bootstrap(m, refs, base.answers, arm.answers) for m in metrics},
            "cost": {
                "train_seconds": arm.train_seconds,
                "index_seconds": retriever.index.seconds if arm.rag else None,
                "prompt_tokens": arm.prompt_tokens,
                "answer_tokens": arm.answer_tokens,
                "seconds_per_answer": arm.seconds + (retrieval_seconds / len(questions) if arm.rag else 0.0),
            },
        }
        table.append(entry)
    with_rag = next(a for a in arm_list if a.name == "base + RAG")
    for arm, entry in zip(arm_list, table, strict=True):
        if arm.rag and arm is not with_rag:  # does tuning help once retrieval is there?
            entry["vs_base_rag"] = {
                m.name: paired_bootstrap(m, refs, with_rag.answers, arm.answers) for m in metrics
            }
    golds = [gold_of(r) for r in rows]
    recall = None
    if any(golds):
        scored = [(h, g) for h, g in zip(hits, golds, strict=True) if g]
        recall = sum(scores.recall_at_k([x.doc_id for x in h], g, top_k) for h, g in scored) / len(scored)
    answers = [
        {"question": q, "reference": ref, "sources": sources(h)} | {a.name: a.answers[i] for a in arm_list}
        for i, (q, ref, h) in enumerate(zip(questions, refs, hits, strict=True))
    ]
    return {
        "questions": len(rows),
        "top_k": top_k,
        "mode": mode,
        "retrieval_recall": recall,
        "primary": primary,
        "arms": table,
        "verdict": verdict(table, primary),
        "answers": answers,
    }


def _metrics(retriever: Retriever, refs: list[str], answer_sets: list[list[str]]) -> list[Metric]:
    """The answer metrics; embedding cosine with the index's own encoder, every text embedded once."""
    texts = list(dict.fromkeys(refs + [a for answers in answer_sets for a in answers]))
    vectors = retriever.embedder.embed(texts)
    where = {t: i for i, t in enumerate(texts)}

    def cosine(pred: str, ref: str) -> float:  # an empty answer says nothing: 0
        return float(torch.dot(vectors[where[pred]], vectors[where[ref]])) if pred.strip() else 0.0

    return [
        Metric("token_f1", per_example=scores.token_f1),
        Metric("exact_match", per_example=scores.exact_match),
        build_metrics(["rouge_l"], None)[0],
        Metric("embedding", per_example=cosine),
    ]


def verdict(table: list[dict], primary: str) -> str:
    """One plain paragraph: the best arm on `primary`, and whether retrieval and tuning each helped."""
    by = {e["arm"]: e for e in table}
    best = max(table, key=lambda e: e["scores"][primary])
    base = table[0]

    def gain(e: dict) -> str:
        d = e["vs_base"][primary]
        return f"{d['diff']:+.3f} (95% CI {d['ci'][0]:+.3f} to {d['ci'][1]:+.3f})"

    def clear(e: dict) -> bool:
        return e is not base and e["vs_base"][primary]["ci"][0] > 0

    parts = []
    if best is base or not clear(best):
        parts.append(
            f"No arm is clearly better than the base model on {primary} ({base['scores'][primary]:.3f}): "
            + (
                f"the best, {best['arm']}, differs by {gain(best)}."
                if best is not base
                else "it scores highest."
            )
        )
    else:
        parts.append(
            f"{best['arm']} answers best: {primary} {best['scores'][primary]:.3f} against the base model's "
            f"{base['scores'][primary]:.3f}, {gain(best)}."
        )
    for arm, what in (("base + RAG", "Retrieval alone"), ("fine-tuned", "Fine-tuning alone")):
        if arm in by:
            e = by[arm]
            word = (
                "helps"
                if clear(e)
                else "hurts"
                if e["vs_base"][primary]["ci"][1] < 0
                else "makes no clear difference"
            )
            parts.append(f"{what} {word}: {gain(e)}.")
    for arm in ("fine-tuned + RAG", "RAFT + RAG"):
        if arm in by:
            d = by[arm]["vs_base_rag"][primary]
            word = "helps" if d["ci"][0] > 0 else "hurts" if d["ci"][1] < 0 else "makes no clear difference"
            parts.append(
                f"With retrieval, {'RAFT' if arm.startswith('RAFT') else 'fine-tuning'} {word}: {arm} vs base + RAG "
                f"{d['diff']:+.3f} (95% CI {d['ci'][0]:+.3f} to {d['ci'][1]:+.3f})."
            )
    return " ".join(parts)
