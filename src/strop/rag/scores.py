"""Retrieval and answer scores that need no LLM judge, each per question (a report averages them).

Retrieval, against the gold documents of a question (binary relevance; `ranked` holds the document id
of each retrieved chunk in rank order, so a document can appear more than once):
    recall@k   |gold among the top k chunks' documents| / |gold|
    MRR        1 / rank of the first chunk of a gold document (0 when none is retrieved)
    nDCG@k     sum over the top k of rel_i / log2(i + 1), a document counting at its first chunk only,
               divided by its best value (the first min(|gold|, k) ranks relevant)
Answers, against the reference answer (SQuAD normalisation: lower case, no punctuation nor articles):
    exact match, token F1 (Rajpurkar et al. 2016), ROUGE-L (eval/metrics), embedding cosine (MiniLM)
Context, against the reference answer (the non-LLM variants of RAGAS's context metrics):
    context recall     share of the reference's content words found in the retrieved passages
    context precision  mean of precision@i over the ranks i of relevant passages, a passage being
                       relevant when it holds at least half of the reference's content words
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter

ARTICLES = re.compile(r"\b(a|an|the)\b")
PUNCTUATION = str.maketrans("", "", string.punctuation)
STOPWORDS = frozenset(
    "a an the of to in on at for and or but is are was were be been it its this that these those with as by "
    "from which who what when where how why do does did can could will would should may might has have had "
    "not no yes i you he she we they them their there than then so such".split()
)


def recall_at_k(ranked: list[str], gold: set[str], k: int) -> float:
    return len(gold & set(ranked[:k])) / len(gold) if gold else 0.0


def reciprocal_rank(ranked: list[str], gold: set[str]) -> float:
    return next((1.0 / r for r, doc in enumerate(ranked, 1) if doc in gold), 0.0)


def ndcg_at_k(ranked: list[str], gold: set[str], k: int) -> float:
    seen: set[str] = set()
    dcg = 0.0
    for i, doc in enumerate(ranked[:k], 1):
        if doc in gold and doc not in seen:  # a document's second chunk earns nothing more
            dcg += 1.0 / math.log2(i + 1)
            seen.add(doc)
    ideal = sum(1.0 / math.log2(i + 1) for i in range(1, min(len(gold), k) + 1))
    return dcg / ideal if ideal else 0.0


def normalize_answer(text: str) -> str:
    return " ".join(ARTICLES.sub(" ", text.lower().translate(PUNCTUATION)).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if not common:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def content_words(text: str) -> set[str]:
    return {w for w in normalize_answer(text).split() if w not in STOPWORDS}


def context_recall(passages: list[str], reference: str) -> float:
    words = content_words(reference)
    if not words:
        return 0.0
    found = set().union(*(content_words(p) for p in passages)) if passages else set()
    return len(words & found) / len(words)


def context_precision(passages: list[str], reference: str, threshold: float = 0.5) -> float:
    words = content_words(reference)
    relevant = [bool(words) and len(words & content_words(p)) / len(words) >= threshold for p in passages]
    hits, total = 0, 0.0
    for i, rel in enumerate(relevant, 1):
        if rel:
            hits += 1
            total += hits / i
    return total / hits if hits else 0.0
