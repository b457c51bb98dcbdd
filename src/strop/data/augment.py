"""Augmentation for small datasets: instruction paraphrases and light input noise on user turns.

Each training record gets up to `copies` augmented copies, with ids `f"{id}~aug{k}"`. A copy may
reword the framing of the first user turn with a hand-written template (the instruction text itself is
kept verbatim) and may add character and word noise (a drop or an adjacent swap) to every user turn,
for robustness to typos. System and assistant turns are never touched, so the expected answers stay
exactly as written. Plain-text records get noise only.

`original_id` maps a copy (and a text window, "doc#2") back to its source id, so a split can keep an
original and all its copies on one side: augmented copies never cross into validation or test.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, replace

from strop.core.errors import ConfigError
from strop.data.formats import Record

AUGMENTED = "~aug"
MAX_NOISE = 0.5

# Neutral framings: none asks for a different length, tone or format of answer.
PARAPHRASES = (
    "Task: {x}",
    "Instruction: {x}",
    "Here is a request: {x}",
    "Could you help with this? {x}",
    "Please help with the following.\n\n{x}",
    "{x}\n\n(Please respond.)",
    "Request:\n{x}",
    "I have something for you.\n\n{x}",
    "Consider the following.\n\n{x}",
    "Here is what I need:\n{x}",
    "Please take a look at this: {x}",
    "Your task is below.\n\n{x}",
)

REPEATED = "~rep"  # a mixture's repeat of an example (strop.data.mixture.mix)
_SUFFIX = re.compile(rf"(?:{AUGMENTED}\d+|{REPEATED}\d+|#\d+)+$")
_COPY = re.compile(rf"(?:{AUGMENTED}|{REPEATED})\d+(?:#\d+)?$")


@dataclass(frozen=True)
class AugmentOptions:
    copies: int = 1  # augmented copies per training record
    paraphrase: bool = True  # reframe the first user turn with one of PARAPHRASES
    char_noise: float = 0.0  # per character of a user turn: probability of a drop or an adjacent swap
    word_noise: float = 0.0  # per word of a user turn: probability of a drop or an adjacent swap
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.copies, bool) or not isinstance(self.copies, int) or self.copies < 1:
            raise ConfigError(f"data.augment.copies: expected an integer >= 1, got {self.copies!r}")
        for name in ("char_noise", "word_noise"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= MAX_NOISE:
                raise ConfigError(
                    f"data.augment.{name}: expected a number in [0, {MAX_NOISE}], got {value!r}"
                )


def original_id(example_id: str) -> str:
    """The source record's id: strips "~augK" (augmented) and "~repK" (mixture repeat) copy suffixes
    and a "#N" text-window suffix."""
    return _SUFFIX.sub("", example_id, count=1)


def is_augmented(example_id: str) -> bool:
    return re.search(rf"{AUGMENTED}\d+(?:#\d+)?$", example_id) is not None


def is_copy(example_id: str) -> bool:
    """An augmented copy or a mixture's repeat: trains, but never validates or tests."""
    return _COPY.search(example_id) is not None


def augment(records: list[Record], options: AugmentOptions) -> list[Record]:
    """The records, followed by their augmented copies (each record's copies together, k = 1..copies).

    Deterministic: copy k of record i depends only on (seed, i, k) and the record. Conversations without
    a user turn are not augmented; plain text only when noise is on. A copy equal to the original or to
    an earlier copy of the same record is left out, so ids can skip a k.
    """
    noisy = options.char_noise > 0 or options.word_noise > 0
    out = list(records)
    for i, rec in enumerate(records):
        has_user = rec.messages is not None and any(m["role"] == "user" for m in rec.messages)
        if not (has_user or (rec.text is not None and noisy)):
            continue
        offset = random.Random(f"strop-augment:{options.seed}:{i}").randrange(len(PARAPHRASES))
        seen = {_content(rec)}
        for k in range(1, options.copies + 1):
            rng = random.Random(f"strop-augment:{options.seed}:{i}:{k}")  # str seeds are stable (sha512)
            template = PARAPHRASES[(offset + k - 1) % len(PARAPHRASES)] if options.paraphrase else None
            copy = _copy(rec, k, template, options, rng)
            if _content(copy) not in seen:
                seen.add(_content(copy))
                out.append(copy)
    return out


def _copy(rec: Record, k: int, template: str | None, options: AugmentOptions, rng: random.Random) -> Record:
    def noise(text: str) -> str:
        return _char_noise(_word_noise(text, options.word_noise, rng), options.char_noise, rng)

    rid = f"{rec.id}{AUGMENTED}{k}"
    if rec.messages is None:
        assert rec.text is not None  # a record has messages or text
        return replace(rec, id=rid, text=noise(rec.text))
    first = next(j for j, m in enumerate(rec.messages) if m["role"] == "user")
    messages = []
    for j, m in enumerate(rec.messages):
        if m["role"] == "user":
            content = noise(m["content"])  # noise the user's text, never the template's
            if j == first and template is not None:
                content = template.format(x=content)
            m = {**m, "content": content}
        messages.append(m)
    return replace(rec, id=rid, messages=tuple(messages))


def _content(rec: Record):
    return rec.text if rec.messages is None else tuple(m["content"] for m in rec.messages)


def _noise(units: list[str], p: float, rng: random.Random, counts) -> list[tuple[int, int]]:
    """Each unit, with probability p, is dropped or swapped with the next one (even odds).

    Returns (slot, unit) pairs: a swap exchanges the units of two slots, a drop removes a slot. A drop
    that would leave no unit for which `counts` is true is skipped, so the text never becomes empty.
    """
    alive = sum(map(counts, units))
    out, i = [], 0
    while i < len(units):
        if p > 0 and rng.random() < p:
            if rng.random() < 0.5 and i + 1 < len(units):
                out += [(i, i + 1), (i + 1, i)]
                i += 2
                continue
            if alive > 1 or not counts(units[i]):
                alive -= counts(units[i])
                i += 1
                continue
        out.append((i, i))
        i += 1
    return out


def _char_noise(text: str, p: float, rng: random.Random) -> str:
    chars = list(text)
    return "".join(chars[u] for _, u in _noise(chars, p, rng, lambda c: not c.isspace()))


def _word_noise(text: str, p: float, rng: random.Random) -> str:
    """Words move and vanish; the whitespace between them (newlines included) stays in its slot."""
    pairs = re.findall(r"(\S+)(\s*)", text)
    if p == 0 or not pairs:
        return text
    words, seps = [w for w, _ in pairs], [s for _, s in pairs]
    out = _noise(words, p, rng, lambda w: True)
    lead = text[: len(text) - len(text.lstrip())]
    last = len(out) - 1  # a dropped last word must not take the trailing whitespace with it
    return lead + "".join(words[u] + (seps[s] if q < last else seps[-1]) for q, (s, u) in enumerate(out))
