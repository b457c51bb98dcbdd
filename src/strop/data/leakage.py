"""Leakage between training and evaluation data: exact and near duplicates found (`check_leakage`) and
acted on (`guard_leakage`: taken out of a held-out split, or a DataError unless data.allow_leakage)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from strop.core.config import DataConfig
from strop.core.errors import DataError
from strop.data.duplicates import find_duplicates
from strop.data.formats import Record

if TYPE_CHECKING:
    from strop.data.build import Datasets

log = logging.getLogger("strop.data")

LEAK_CHECK_MAX_EXAMPLES = 50_000  # MinHash over more takes minutes in Python: left to a data check


def guard_leakage(cfg: DataConfig, data: Datasets, splits: dict[str, list[Record]]) -> dict:
    """Check for leakage, then act on it. Copies in a validation split strop held out itself are taken
    out of it (duplicates inside the training file put them there). Copies in validation or test files
    the user gave stop the run, unless `data.allow_leakage` says to go on (the report then warns)."""
    out = check_leakage(splits)
    if not out.get("checked"):
        return out
    found = {k: out[k].pop("ids") for k in ("train_validation", "train_test") if k in out}
    if found.get("train_validation") and not cfg.validation:
        drop = set(found.pop("train_validation"))
        assert data.validation is not None  # its copies were found in it
        keep = [i for i, e in enumerate(data.validation.example_ids) if e not in drop]
        data.validation = data.validation.subset(keep) if keep else None
        data.validation_groups = None if not keep else _regroup(data.validation_groups, keep)
        splits["validation"] = [r for r in splits["validation"] if r.id not in drop]
        out["train_validation"]["removed_from_validation"] = len(drop)
        data.summary["validation_examples"] = len(keep)
        log.info("data: took %d held-out example(s) that copy training ones out of validation", len(drop))
    leaked = {k: v for k, v in found.items() if v}
    if leaked and not cfg.allow_leakage:
        lines = [
            f"{len(ids)} {k.split('_')[1]} example(s) copy training examples, e.g. "
            + ", ".join(f"{a} ~ {b} ({kind})" for a, b, kind in out[k]["pairs"][:5])
            for k, ids in leaked.items()
        ]
        raise DataError(
            "leakage between training and evaluation data:\n  "
            + "\n  ".join(lines)
            + "\nScores on copies of training examples measure memory, not skill. Remove them "
            "(`strop data prepare` deduplicates before splitting; `strop data check` lists every pair), "
            "or set data.allow_leakage: true to train anyway."
        )
    return out


def _regroup(groups: dict[str, list[int]] | None, keep: list[int]) -> dict[str, list[int]] | None:
    if groups is None:
        return None
    new_index = {old: new for new, old in enumerate(keep)}
    regrouped = {k: [new_index[i] for i in v if i in new_index] for k, v in groups.items()}
    return {k: v for k, v in regrouped.items() if v}


def check_leakage(splits: dict[str, list[Record]]) -> dict:
    """Exact and near duplicates between the training examples and the validation and test sets:
    logged as warnings with example ids and returned for the data summary."""
    if not splits["validation"] and not splits["test"]:
        return {"checked": False}
    total = sum(map(len, splits.values()))
    if total > LEAK_CHECK_MAX_EXAMPLES:
        log.info(
            "data: %d examples: near-duplicate leakage check skipped (over %d)",
            total,
            LEAK_CHECK_MAX_EXAMPLES,
        )
        return {"checked": False}
    dups = find_duplicates(splits)
    out: dict = {"checked": True}
    for other in ("validation", "test"):
        if not splits[other]:
            continue
        pairs = dups.leaks("train", other)
        out[f"train_{other}"] = {
            "exact": sum(kind == "exact" for *_, kind in pairs),
            "near": sum(kind == "near" for *_, kind in pairs),
            "pairs": [[b.id, a.id, kind] for a, b, kind in pairs[:20]],
            "ids": sorted({b.id for _, b, _ in pairs}),
        }
        if pairs:
            shown = ", ".join(f"{b.id} ~ {a.id} ({kind})" for a, b, kind in pairs[:5])
            log.warning(
                "data: leakage: %d %s example(s) duplicate or nearly duplicate training examples: %s%s",
                len({b for _, b, _ in pairs}),
                other,
                shown,
                " ..." if len(pairs) > 5 else "",
            )
    return out
