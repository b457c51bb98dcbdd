"""Exact and near duplicates within a split, and across splits (leakage), naming example ids.

Texts are compared after normalization (Unicode NFKC, case, punctuation and whitespace do not
count). Near duplicates: MinHash signatures over word 3-gram shingles, candidate pairs from
locality-sensitive hashing (datasketch), each candidate then confirmed by the exact Jaccard
similarity of the two shingle sets, so a reported pair is never an artefact of the sketch.
Broder 1997 (MinHash); Lee et al. 2022, https://arxiv.org/abs/2107.06499 (dedup for LM training).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass, field

from strop.data.formats import Record

NEAR_THRESHOLD = 0.8  # Jaccard similarity of word 3-gram sets
SHINGLE = 3
NUM_PERM = 128


@dataclass(frozen=True)
class Example:
    split: str
    id: str


@dataclass
class Duplicates:
    exact: list[list[Example]] = field(default_factory=list)  # groups of identical normalized texts
    near: list[tuple[Example, Example, float]] = field(default_factory=list)  # (a, b, Jaccard), not exact

    def leaks(self, a: str, b: str) -> list[tuple[Example, Example, str]]:
        """Pairs with one side in split `a` and the other in `b`, with the kind ('exact' or 'near')."""
        out = []
        for group in self.exact:
            out += [(x, y, "exact") for x in group if x.split == a for y in group if y.split == b]
        out += [
            (x, y, "near") if x.split == a else (y, x, "near")
            for x, y, _ in self.near
            if {x.split, y.split} == {a, b}
        ]
        return out

    def within(self, split: str) -> int:
        """Examples in `split` that repeat an earlier example of the same split (exactly or nearly)."""
        repeats = sum(max(0, sum(e.split == split for e in g) - 1) for g in self.exact)
        return repeats + sum(x.split == y.split == split for x, y, _ in self.near)


def normalize(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).lower()
    return " ".join(re.findall(r"\w+", text))


def record_text(rec: Record) -> str:
    """What two examples must share to be duplicates: every turn's role and content, or the text."""
    if rec.text is not None:
        return rec.text
    return "\n".join(f"{m['role']}: {m['content']}" for m in rec.messages or ())


def shingles(normalized: str) -> set[str]:
    words = normalized.split()
    if len(words) <= SHINGLE:
        return {" ".join(words)}
    return {" ".join(words[i : i + SHINGLE]) for i in range(len(words) - SHINGLE + 1)}


def find_duplicates(splits: dict[str, list[Record]], threshold: float = NEAR_THRESHOLD) -> Duplicates:
    """Exact groups and near pairs over all examples of all splits."""
    from datasketch import MinHash, MinHashLSH

    examples: list[Example] = []
    texts: list[str] = []
    for split, records in splits.items():
        for rec in records:
            examples.append(Example(split, rec.id))
            texts.append(normalize(record_text(rec)))

    out = Duplicates()
    by_hash: dict[str, list[int]] = {}
    for i, t in enumerate(texts):
        by_hash.setdefault(hashlib.sha1(t.encode()).hexdigest(), []).append(i)
    out.exact = [[examples[i] for i in group] for group in by_hash.values() if len(group) > 1]

    firsts = [group[0] for group in by_hash.values()]  # near pairs between distinct texts only
    sets = {i: shingles(texts[i]) for i in firsts}
    lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
    for i in firsts:
        m = MinHash(num_perm=NUM_PERM, seed=1)
        m.update_batch([s.encode() for s in sets[i]])
        for j in lsh.query(m):
            sim = len(sets[i] & sets[j]) / len(sets[i] | sets[j])
            if sim >= threshold:
                for a in by_hash[hashlib.sha1(texts[j].encode()).hexdigest()]:
                    for b in by_hash[hashlib.sha1(texts[i].encode()).hexdigest()]:
                        out.near.append((examples[a], examples[b], sim))
        lsh.insert(i, m)
    return out
