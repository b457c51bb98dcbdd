"""Feedback rows -> tokenized completions for KTO: `{prompt, completion, label: true|false}`, one
completion judged good or bad, no pair needed (formats.py, format `feedback`); preference pairs are
read as a good and a bad row each.

Each row is rendered with the chat template and only the completion carries loss; a long row loses its
prompt's oldest tokens first (pairs.fit_conversation). KTO estimates its reference point, the KL
divergence of the policy from the start, on mismatched rows: row i's prompt with the completion of
row i-1 (TRL's choice), kept beside each row as `.rejected` so the reference log-probs of both are
computed once before training. `.targets` holds 1 for a good completion, 0 for a bad one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np

from strop.core.config import DataConfig, DatasetSource
from strop.core.data_config import MAX_ROW_BYTES
from strop.core.errors import DataError
from strop.data.build import read_records
from strop.data.formats import Record
from strop.data.pairs import fit_conversation, read_splits
from strop.data.template import ChatTemplate
from strop.data.tokenized import TokenizedSet

log = logging.getLogger("strop.data")


@dataclass
class FeedbackData:
    train: TokenizedSet  # completions, with `.rejected` the mismatched (KL) rows and `.targets` 1/0
    validation: TokenizedSet | None
    records: dict[str, list[Record]]
    summary: dict


def build_feedback(cfg: DataConfig, template: ChatTemplate, seed: int) -> FeedbackData:
    splits, leakage = read_splits(cfg, seed, _read, unit="row(s)")
    train = encode_feedback(splits["train"], template, cfg.max_length)
    if len(train) < 2:
        raise DataError(
            f"KTO needs at least 2 training rows with a completion left after tokenization, got "
            f"{len(train)} (raise data.max_length, or add rows)"
        )
    val = encode_feedback(splits["validation"], template, cfg.max_length) if splits["validation"] else None
    assert train.targets is not None  # encode_feedback sets the good/bad targets
    good = int(sum(train.targets))
    summary = {
        "train_rows": len(train),
        "train_desirable": good,
        "train_undesirable": len(train) - good,
        "validation_rows": len(val) if val is not None else 0,
        "dropped_rows": train.stats["dropped"] + (val.stats["dropped"] if val is not None else 0),
        "truncated_rows": train.stats["truncated"] + (val.stats["truncated"] if val is not None else 0),
        "train_tokens": int(sum(len(x) for x in train.ids)),
        "leakage": leakage,
    }
    log.info(
        "data: %d train rows (%d good, %d bad) / %d validation rows (%d truncated, %d dropped)",
        len(train),
        good,
        len(train) - good,
        summary["validation_rows"],
        summary["truncated_rows"],
        summary["dropped_rows"],
    )
    return FeedbackData(train, val, splits, summary)


def encode_feedback(records: list[Record], template: ChatTemplate, max_length: int) -> TokenizedSet:
    """Completion rows (loss on the completion only), their good/bad targets and, as `.rejected`, each
    row's mismatched KL row: its prompt with the previous kept row's completion."""
    kept, targets, truncated, dropped = [], [], 0, 0
    for r in records:
        assert r.messages is not None and r.desirable is not None  # _read: conversations with a label
        enc = template.encode(r.messages, last_turn_only=True)
        ids, trained = fit_conversation(enc, max_length)
        if not any(trained[1:]):  # token 0 is never predicted
            dropped += 1
            continue
        truncated += len(ids) < len(enc.ids)
        kept.append((r, ids, trained))
        targets.append(int(r.desirable))
    kl_ids, kl_trained = [], []
    for j, (r, _, _) in enumerate(kept):
        prev = kept[j - 1][0].messages
        assert r.messages is not None and prev is not None  # checked in the loop above
        other = prev[-1]["content"]  # row j-1's completion (the last row's for row 0)
        enc = template.encode(
            [*r.messages[:-1], {"role": "assistant", "content": other}], last_turn_only=True
        )
        ids, trained = fit_conversation(enc, max_length)
        kl_ids.append(np.asarray(ids, dtype=np.int32))
        kl_trained.append(np.asarray(trained, dtype=bool))
    names = [r.id for r, _, _ in kept]
    out = TokenizedSet(
        [np.asarray(ids, dtype=np.int32) for _, ids, _ in kept],
        [np.asarray(tr, dtype=bool) for _, _, tr in kept],
        names,
        {"truncated": truncated, "dropped": dropped},
        targets=targets,
    )
    out.rejected = TokenizedSet(kl_ids, kl_trained, list(names), {})
    return out


def _read(src: DatasetSource, skip_bad_rows: bool, max_row_bytes: int = MAX_ROW_BYTES) -> list[Record]:
    """Feedback rows; preference pairs are split into a good and a bad row (TRL's
    unpair_preference_dataset), ids `ID#0` and `ID#1`, so a held-out split keeps the two together."""
    out = []
    for r in read_records(src, [] if skip_bad_rows else None, max_row_bytes):
        if r.rejected is not None:
            assert r.messages is not None  # preference rows are conversations
            bad = (*r.messages[:-1], {"role": "assistant", "content": r.rejected})
            out.append(replace(r, id=f"{r.id}#0", rejected=None, margin=None, desirable=True))
            out.append(replace(r, id=f"{r.id}#1", messages=bad, rejected=None, margin=None, desirable=False))
        elif r.desirable is None:
            raise DataError(
                f"{r.where}: KTO needs feedback rows {{prompt, completion, label: true|false}} or preference "
                "pairs {prompt, chosen, rejected}; set data.train[].format and fields to map yours"
            )
        else:
            out.append(r)
    return out
