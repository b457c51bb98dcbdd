"""Split documents into chunks of at most `size` tokens that overlap by up to `overlap` tokens.

Chunks are made of whole paragraphs where they fit; a paragraph longer than a chunk is cut at sentence
ends, and a sentence longer than a chunk into windows of tokens. Consecutive chunks share their last
units (paragraphs or sentences) up to `overlap` tokens, so a fact on a boundary is whole in one chunk.
Each chunk is a span of its document's text, so what is retrieved is what the document says.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

PARAGRAPH = re.compile(r"\n\s*\n")
SENTENCE_END = re.compile(r"(?<=[.!?。])\s+")


@dataclass(frozen=True)
class Chunk:
    doc_id: str
    number: int  # position within its document, from 0
    start: int  # character span in the document's text
    end: int
    text: str
    tokens: int


Counter = Callable[[str], int]
Splitter = Callable[[str, int], list[tuple[int, int]]]  # (text, size) -> character spans of windows


def chunk_text(
    doc_id: str, text: str, size: int, overlap: int, count: Counter, windows: Splitter
) -> list[Chunk]:
    if size < 1 or not 0 <= overlap < size:
        raise ValueError(f"chunk size {size} and overlap {overlap}: need size >= 1 and 0 <= overlap < size")
    units = _units(text, size, count, windows)
    chunks: list[Chunk] = []
    i = 0
    while i < len(units):
        j, total = i, 0
        while j < len(units) and (j == i or total + units[j][2] <= size):
            total += units[j][2]
            j += 1
        start, end = units[i][0], units[j - 1][1]
        chunks.append(Chunk(doc_id, len(chunks), start, end, text[start:end], total))
        if j == len(units):
            break
        back, shared = j, 0  # step back over the last units that fit in the overlap, keeping progress
        while back - 1 > i and shared + units[back - 1][2] <= overlap:
            back -= 1
            shared += units[back][2]
        i = back
    return chunks


def _units(text: str, size: int, count: Counter, windows: Splitter) -> list[tuple[int, int, int]]:
    """(start, end, tokens) of paragraphs, or of a long paragraph's sentences or token windows."""
    units = []
    for p_start, p_end in _spans(text, PARAGRAPH, 0, len(text)):
        n = count(text[p_start:p_end])
        if n <= size:
            units.append((p_start, p_end, n))
            continue
        for s_start, s_end in _spans(text, SENTENCE_END, p_start, p_end):
            n = count(text[s_start:s_end])
            if n <= size:
                units.append((s_start, s_end, n))
                continue
            for w_start, w_end in windows(text[s_start:s_end], size):
                piece = text[s_start + w_start : s_start + w_end]
                a = s_start + w_start + len(piece) - len(piece.lstrip())
                b = a + len(piece.strip())
                if b > a:
                    units.append((a, b, count(text[a:b])))
    return units


def _spans(text: str, separator: re.Pattern, start: int, end: int) -> list[tuple[int, int]]:
    """Spans between separators in text[start:end], without surrounding whitespace; empty ones dropped."""
    spans, at = [], start
    for m in separator.finditer(text, start, end):
        spans.append((at, m.start()))
        at = m.end()
    spans.append((at, end))
    out = []
    for a, b in spans:
        piece = text[a:b]
        stripped = piece.strip()
        if stripped:
            a += len(piece) - len(piece.lstrip())
            out.append((a, a + len(stripped)))
    return out
