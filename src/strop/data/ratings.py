"""Rated replies -> tokenized conversations with a score each, for reward models trained by regression
(`reward_model.target: ratings`): human reviewers' 1-5 scores, say, instead of pairwise choices.

Rows: `{prompt, response, rating}` (`completion` for `response` also works; an HH-style "Human: ...
Assistant:" prompt becomes turns) or `{messages, rating}` ending with the rated assistant turn. The
rating field is named by `reward_model.rating_field`. The whole conversation is rendered with the chat
template and truncated at max_length (counted); a bad row is an error naming file:line and the field.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from strop.core.config import DataConfig, DatasetSource
from strop.core.data_config import MAX_ROW_BYTES
from strop.core.errors import DataError
from strop.data.build import held_out, source_rows
from strop.data.formats import check_fields, hh_turns
from strop.data.pairs import fit_conversation
from strop.data.read import Rejected
from strop.data.template import ChatTemplate
from strop.data.tokenized import TokenizedSet

log = logging.getLogger("strop.data")


@dataclass
class RatingData:
    train: TokenizedSet
    validation: TokenizedSet | None
    test: TokenizedSet | None
    summary: dict
    rejected: list[Rejected]  # malformed rows left out (data.skip_bad_rows)


def read_rated(
    src: DatasetSource, field: str, rejected: list[Rejected] | None = None, max_row_bytes: int = MAX_ROW_BYTES
) -> list[tuple[str, list[dict], float]]:
    """(id, conversation ending with the rated reply, rating) per row. A malformed row is an error naming
    file:line and the field, or, when `rejected` is given (data.skip_bad_rows), is appended there and
    left out."""
    out, rows = [], source_rows(src, rejected, max_row_bytes)
    if rows:
        check_fields(src.path, rows[0].data, src.fields)
    for row in rows:
        try:
            out.append(_rated(row, src, field))
        except _BadRow as bad:
            if rejected is None:
                raise DataError(f"{row.where}: field {bad.field!r}: {bad.reason}") from None
            rejected.append(Rejected(row.where, bad.field, bad.reason))
    return out


class _BadRow(Exception):
    def __init__(self, field: str, reason: str):
        self.field, self.reason = field, reason


def _rated(row, src: DatasetSource, field: str) -> tuple[str, list[dict], float]:
    d = dict(row.data)
    d |= {ours: row.data[theirs] for ours, theirs in src.fields.items() if theirs in row.data}
    rating = d.get(field)
    if isinstance(rating, bool) or not isinstance(rating, (int, float)) or not math.isfinite(rating):
        try:
            rating = float(str(rating).strip())
            if not math.isfinite(rating):
                raise ValueError
        except ValueError:
            raise _BadRow(field, f"expected a number, got {d.get(field)!r}") from None
    reply = d.get("response", d.get("completion"))
    if isinstance(d.get("messages"), list):
        msgs = [m for m in d["messages"] if isinstance(m, dict)]
        if not msgs or msgs[-1].get("role") != "assistant" or not isinstance(msgs[-1].get("content"), str):
            raise _BadRow("messages", "must end with the rated assistant turn")
    elif isinstance(d.get("prompt"), str) and isinstance(reply, str) and reply.strip():
        msgs = [*hh_turns(d["prompt"]), {"role": "assistant", "content": reply.strip()}]
    else:
        raise _BadRow(
            "response", f"expected 'prompt' and a non-empty 'response' (or 'messages') with {field!r}"
        )
    rid = str(d["id"]) if isinstance(d.get("id"), (str, int)) else row.where
    return rid, msgs, float(rating)


def encode_rated(
    items: list[tuple[str, list[dict], float]], template: ChatTemplate, max_length: int
) -> TokenizedSet:
    """A long conversation loses its prompt's oldest tokens first (`fit_conversation`); one whose rated reply
    is still cut away entirely is dropped (and counted): the reward would be learned from the prompt."""
    ids, kept, truncated, dropped = [], [], 0, 0
    for item in items:
        enc = template.encode(item[1], last_turn_only=True)
        fitted, trained = fit_conversation(enc, max_length)
        truncated += len(enc.ids) > max_length
        if not any(trained):
            dropped += 1
            continue
        ids.append(np.asarray(fitted, dtype=np.int32))
        kept.append(item)
    return TokenizedSet(
        ids,
        [np.zeros(len(x), dtype=bool) for x in ids],
        [i for i, _, _ in kept],
        {"truncated": truncated, "dropped": dropped},
        ratings=np.asarray([r for _, _, r in kept], dtype=np.float32),
    )


def build_ratings(cfg: DataConfig, template: ChatTemplate, seed: int, field: str) -> RatingData:
    rejected: list[Rejected] | None = [] if cfg.skip_bad_rows else None
    splits = {
        split: [x for src in sources for x in read_rated(src, field, rejected, cfg.max_row_bytes)]
        for split, sources in (("train", cfg.train), ("validation", cfg.validation), ("test", cfg.test))
    }
    if not cfg.validation and cfg.val_fraction > 0 and len(splits["train"]) >= 2:
        held = set(held_out([x[0] for x in splits["train"]], cfg.val_fraction, seed))
        splits["validation"] = [x for i, x in enumerate(splits["train"]) if i in held]
        splits["train"] = [x for i, x in enumerate(splits["train"]) if i not in held]
    if not splits["train"]:
        raise DataError("data.train: no rated replies")
    sets = {k: encode_rated(v, template, cfg.max_length) if v else None for k, v in splits.items()}
    train = sets["train"]
    assert train is not None  # splits["train"] is not empty
    if len(train) == 0:
        raise DataError(f"data.train: every rated reply is cut away at max_length {cfg.max_length}; raise it")
    r = train.ratings
    assert r is not None  # encode_rated sets the ratings
    summary = {
        "train_examples": len(train),
        "validation_examples": len(sets["validation"]) if sets["validation"] is not None else 0,
        "test_examples": len(sets["test"]) if sets["test"] is not None else 0,
        "truncated": sum(s.stats["truncated"] for s in sets.values() if s is not None),
        "dropped_reply_cut_away": sum(s.stats["dropped"] for s in sets.values() if s is not None),
        "rejected_rows": len(rejected or []),
        "ratings": {
            "min": float(r.min()),
            "max": float(r.max()),
            "mean": float(r.mean()),
            "std": float(r.std()),
        },
    }
    if rejected:
        log.warning(
            "data: left out %d malformed rated row(s) (data.skip_bad_rows), e.g. %s",
            len(rejected),
            rejected[0],
        )
    return RatingData(train, sets["validation"], sets["test"], summary, rejected or [])
