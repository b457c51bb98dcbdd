"""Preference pairs -> tokenized chosen and rejected conversations, for reward models and DPO.

Rows are `{prompt, chosen, rejected}` (an HH-style "Human: ... Assistant:" prompt becomes turns) or
chat conversations whose chosen and rejected final turns differ (formats.py). Both sides are rendered
with the chat template, so the prompt tokens are identical and only the reply differs; the loss mask
marks each final reply (with its end-of-turn). A long pair loses its prompt's oldest tokens first
(`fit_reply`); a pair is dropped, and counted, when nothing is left to compare.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from strop.core.config import DataConfig, DatasetSource
from strop.core.data_config import MAX_ROW_BYTES
from strop.core.errors import DataError
from strop.data.build import held_out, read_records
from strop.data.formats import Record
from strop.data.leakage import check_leakage
from strop.data.template import ChatTemplate, Encoded
from strop.data.tokenized import TokenizedSet

log = logging.getLogger("strop.data")


@dataclass
class PairData:
    train: TokenizedSet  # chosen rows, with `.rejected`
    validation: TokenizedSet | None
    records: dict[str, list[Record]]
    summary: dict


def build_pairs(cfg: DataConfig, template: ChatTemplate, seed: int) -> PairData:
    splits, leakage = read_splits(cfg, seed, _read)
    train = encode_pairs(splits["train"], template, cfg.max_length)
    if len(train) == 0:
        raise DataError("no preference pairs left after tokenization; raise data.max_length")
    val = encode_pairs(splits["validation"], template, cfg.max_length) if splits["validation"] else None
    assert train.rejected is not None  # encode_pairs sets the rejected side
    summary = {
        "train_pairs": len(train),
        "validation_pairs": len(val) if val is not None else 0,
        "dropped_pairs": train.stats["dropped"] + (val.stats["dropped"] if val is not None else 0),
        "truncated_pairs": train.stats["truncated"] + (val.stats["truncated"] if val is not None else 0),
        "replies_cut_pairs": train.stats["replies_cut"]
        + (val.stats["replies_cut"] if val is not None else 0),
        "train_tokens": int(sum(len(x) for x in train.ids) + sum(len(x) for x in train.rejected.ids)),
        "train_pairs_with_margin": sum(r.margin is not None for r in splits["train"]),
        "leakage": leakage,
    }
    log.info(
        "data: %d train / %d validation preference pairs (%d truncated, %d of them with a reply cut; "
        "%d dropped: replies cut away or identical)",
        len(train),
        summary["validation_pairs"],
        summary["truncated_pairs"],
        summary["replies_cut_pairs"],
        summary["dropped_pairs"],
    )
    return PairData(train, val, splits, summary)


def read_splits(
    cfg: DataConfig, seed: int, read, unit: str = "pair(s)"
) -> tuple[dict[str, list[Record]], dict]:
    """(splits, leakage report): the train, validation and test records of a preference-like data config (`read(source,
    skip_bad_rows, max_row_bytes)` reads one source): validation held out of train when none is given; validation rows
    that copy training rows dropped (or refused when given), test rows that do so refused, unless
    data.allow_leakage."""
    splits = {
        split: [r for src in sources for r in read(src, cfg.skip_bad_rows, cfg.max_row_bytes)]
        for split, sources in (("train", cfg.train), ("validation", cfg.validation), ("test", cfg.test))
    }
    if not cfg.validation and cfg.val_fraction > 0 and len(splits["train"]) >= 2:
        held = set(held_out([r.id for r in splits["train"]], cfg.val_fraction, seed))
        splits["validation"] = [r for i, r in enumerate(splits["train"]) if i in held]
        splits["train"] = [r for i, r in enumerate(splits["train"]) if i not in held]
    leakage = check_leakage(splits)
    leaked = set(leakage.get("train_validation", {}).get("ids", []))
    if leaked and not cfg.validation:
        splits["validation"] = [r for r in splits["validation"] if r.id not in leaked]
    elif leaked and not cfg.allow_leakage:
        raise DataError(
            f"data.validation: {len(leaked)} {unit} duplicate or nearly duplicate training {unit}: "
            f"{', '.join(sorted(leaked)[:10])}; remove them or set data.allow_leakage: true"
        )
    in_test = sorted(leakage.get("train_test", {}).get("ids", []))
    if in_test and not cfg.allow_leakage:  # a score on copies of training rows measures memory
        raise DataError(
            f"data.test: {len(in_test)} {unit} duplicate or nearly duplicate training {unit}: "
            f"{', '.join(in_test[:10])}; remove them or set data.allow_leakage: true"
        )
    return splits, leakage


def encode_pairs(records: list[Record], template: ChatTemplate, max_length: int) -> TokenizedSet:
    """Chosen rows (with `.rejected` holding the other side, row for row).

    Only the final reply carries loss (earlier assistant turns are part of the prompt). A pair longer
    than `max_length` loses its prompt's oldest tokens first, down to half the budget, so the replies,
    where the two sides differ, survive; only then are the replies cut at their end. A pair whose
    replies are identical after that cut has nothing to compare and is dropped.
    """
    sides: dict[str, list] = {
        "ids": [],
        "trained": [],
        "r_ids": [],
        "r_trained": [],
        "kept": [],
        "margin": [],
    }
    truncated = replies_cut = dropped = 0
    for r in records:
        assert r.messages is not None  # preference rows are conversations
        chosen = template.encode(r.messages, last_turn_only=True)
        rejected = template.encode(
            [*r.messages[:-1], {"role": "assistant", "content": r.rejected}], last_turn_only=True
        )
        if not (any(chosen.trained) and any(rejected.trained)):
            dropped += 1
            continue
        start = chosen.trained.index(True)  # the prompt (identical on both sides) ends here
        reply_len = max(len(chosen.ids), len(rejected.ids)) - start
        keep_prompt, keep_reply = fit_reply(start, reply_len, max_length)
        window = slice(start - keep_prompt, start + keep_reply)
        c_ids, c_tr = chosen.ids[window], chosen.trained[window]
        r_ids, r_tr = rejected.ids[window], rejected.trained[window]
        if c_ids == r_ids or not any(c_tr[1:]) or not any(r_tr[1:]):  # token 0 is never predicted
            dropped += 1
            continue
        truncated += keep_prompt < start or keep_reply < reply_len
        replies_cut += keep_reply < reply_len
        sides["ids"].append(np.asarray(c_ids, dtype=np.int32))
        sides["trained"].append(np.asarray(c_tr, dtype=bool))
        sides["r_ids"].append(np.asarray(r_ids, dtype=np.int32))
        sides["r_trained"].append(np.asarray(r_tr, dtype=bool))
        sides["kept"].append(r.id)
        sides["margin"].append(r.margin)
    stats = {"truncated": truncated, "replies_cut": replies_cut, "dropped": dropped}
    out = TokenizedSet(sides["ids"], sides["trained"], sides["kept"], stats)
    out.rejected = TokenizedSet(sides["r_ids"], sides["r_trained"], list(sides["kept"]), {})
    if any(m is not None for m in sides["margin"]):  # a row without a margin asks for none (0)
        out.margins = np.array([m or 0.0 for m in sides["margin"]], dtype=np.float32)
    return out


def fit_conversation(enc: Encoded, max_length: int) -> tuple[list[int], list[bool]]:
    """One conversation (ids, loss mask) cut as `fit_reply` cuts a pair; its final reply starts at the
    first trained token (encode it with `last_turn_only`)."""
    start = enc.trained.index(True) if any(enc.trained) else len(enc.ids)
    keep_prompt, keep_reply = fit_reply(start, len(enc.ids) - start, max_length)
    window = slice(start - keep_prompt, start + keep_reply)
    return enc.ids[window], enc.trained[window]


def fit_reply(prompt_len: int, reply_len: int, max_length: int) -> tuple[int, int]:
    """(prompt tokens kept, counted from its end; reply tokens kept, counted from its start) within
    `max_length`: the prompt gives up its oldest tokens first, down to half the budget, then the reply
    is cut at its end. The latest turns are what a reply answers; TRL's DPO keeps the prompt's end too.
    """
    keep_prompt = min(prompt_len, max(max_length - reply_len, max_length // 2, 1))
    return keep_prompt, min(reply_len, max_length - keep_prompt)


def _read(src: DatasetSource, skip_bad_rows: bool, max_row_bytes: int = MAX_ROW_BYTES) -> list[Record]:
    if src.format == "auto":
        src = src.model_copy(update={"format": "preference"})
    records = read_records(src, [] if skip_bad_rows else None, max_row_bytes)  # as SFT does
    bad = next((r for r in records if r.rejected is None), None)
    if bad is not None:
        raise DataError(
            f"{bad.where}: format {src.format}: preference training needs a rejected reply per row"
        )
    return records
