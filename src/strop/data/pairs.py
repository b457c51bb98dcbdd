"""Preference pairs -> tokenized chosen and rejected conversations, for reward models and DPO.

Rows are `{prompt, chosen, rejected}` (an HH-style "Human: ... Assistant:" prompt becomes turns) or
chat conversations whose chosen and rejected final turns differ (formats.py). Both sides are rendered
with the chat template, so the prompt tokens are identical and only the reply differs; the loss mask
marks each reply (with its end-of-turn). A pair is dropped, and counted, when truncation at
`max_length` cuts either reply away entirely.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from strop.core.config import DataConfig, DatasetSource
from strop.core.errors import DataError
from strop.data.build import check_leakage, held_out, read_records
from strop.data.formats import Record
from strop.data.template import ChatTemplate
from strop.data.tokenized import TokenizedSet

log = logging.getLogger("strop.data")


@dataclass
class PairData:
    train: TokenizedSet  # chosen rows, with `.rejected`
    validation: TokenizedSet | None
    records: dict[str, list[Record]]
    summary: dict


def build_pairs(cfg: DataConfig, template: ChatTemplate, seed: int) -> PairData:
    splits = {
        split: [r for src in sources for r in _read(src, cfg.skip_bad_rows)]
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
            f"data.validation: {len(leaked)} pair(s) duplicate or nearly duplicate training pairs: "
            f"{', '.join(sorted(leaked)[:10])}; remove them or set data.allow_leakage: true"
        )
    train = encode_pairs(splits["train"], template, cfg.max_length)
    if len(train) == 0:
        raise DataError("no preference pairs left after tokenization; raise data.max_length")
    val = encode_pairs(splits["validation"], template, cfg.max_length) if splits["validation"] else None
    summary = {
        "train_pairs": len(train),
        "validation_pairs": len(val) if val is not None else 0,
        "dropped_pairs": train.stats["dropped"] + (val.stats["dropped"] if val is not None else 0),
        "truncated_pairs": train.stats["truncated"] + (val.stats["truncated"] if val is not None else 0),
        "train_tokens": int(sum(len(x) for x in train.ids) + sum(len(x) for x in train.rejected.ids)),
        "train_pairs_with_margin": sum(r.margin is not None for r in splits["train"]),
        "leakage": leakage,
    }
    log.info(
        "data: %d train / %d validation preference pairs (%d truncated, %d dropped: a reply cut away)",
        len(train),
        summary["validation_pairs"],
        summary["truncated_pairs"],
        summary["dropped_pairs"],
    )
    return PairData(train, val, splits, summary)


def encode_pairs(records: list[Record], template: ChatTemplate, max_length: int) -> TokenizedSet:
    """Chosen rows (with `.rejected` holding the other side, row for row)."""
    sides: dict[str, list] = {
        "ids": [],
        "trained": [],
        "r_ids": [],
        "r_trained": [],
        "kept": [],
        "margin": [],
    }
    truncated = dropped = 0
    for r in records:
        chosen = template.encode(r.messages)
        rejected = template.encode([*r.messages[:-1], {"role": "assistant", "content": r.rejected}])
        c_ids, c_tr = chosen.ids[:max_length], chosen.trained[:max_length]
        r_ids, r_tr = rejected.ids[:max_length], rejected.trained[:max_length]
        if not any(c_tr[1:]) or not any(r_tr[1:]):
            dropped += 1
            continue
        truncated += len(chosen.ids) > max_length or len(rejected.ids) > max_length  # kept, but cut
        sides["ids"].append(np.asarray(c_ids, dtype=np.int32))
        sides["trained"].append(np.asarray(c_tr, dtype=bool))
        sides["r_ids"].append(np.asarray(r_ids, dtype=np.int32))
        sides["r_trained"].append(np.asarray(r_tr, dtype=bool))
        sides["kept"].append(r.id)
        sides["margin"].append(r.margin)
    stats = {"truncated": truncated, "dropped": dropped}
    out = TokenizedSet(sides["ids"], sides["trained"], sides["kept"], stats)
    out.rejected = TokenizedSet(sides["r_ids"], sides["r_trained"], list(sides["kept"]), {})
    if any(m is not None for m in sides["margin"]):  # a row without a margin asks for none (0)
        out.margins = np.array([m or 0.0 for m in sides["margin"]], dtype=np.float32)
    return out


def _read(src: DatasetSource, skip_bad_rows: bool) -> list[Record]:
    if src.format == "auto":
        src = src.model_copy(update={"format": "preference"})
    records = read_records(src, [] if skip_bad_rows else None)  # honour data.skip_bad_rows as SFT does
    bad = next((r for r in records if r.rejected is None), None)
    if bad is not None:
        raise DataError(
            f"{bad.where}: format {src.format}: preference training needs a rejected reply per row"
        )
    return records
