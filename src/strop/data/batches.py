"""Micro-batches: a seeded order per epoch, padded tensors, and labels from the loss mask.

Micro-batch `m` of the run is a pure function of (seed, m), so the data position of a resumed run is
just the step number: nothing about the iterator needs saving.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from strop.data.tokenized import TokenizedSet

IGNORE = -100


class BatchPlan:
    def __init__(self, n_examples: int, batch_size: int, seed: int, shuffle: bool = True):
        self.n, self.batch_size, self.seed, self.shuffle = n_examples, batch_size, seed, shuffle
        self.per_epoch = math.ceil(n_examples / batch_size)
        self._cache: tuple[int, list[np.ndarray]] | None = None

    def micro_batch(self, m: int) -> np.ndarray:
        """Example indices of the run's m-th micro-batch (0-based, counting across epochs)."""
        epoch, j = divmod(m, self.per_epoch)
        if self._cache is None or self._cache[0] != epoch:
            order = np.arange(self.n)
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._cache = (epoch, [order[i : i + self.batch_size] for i in range(0, self.n, self.batch_size)])
        return self._cache[1][j]


def collate(ts: TokenizedSet, index, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask (B, T) and labels (B, T), IGNORE where untrained,
    plus what the set carries per example: cached teacher top-k, ratings, class labels. A set of pairs
    is collated as pairs (`collate_pairs`)."""
    if ts.rejected is not None:
        return collate_pairs(ts, index, pad_id)
    rows = [ts.ids[i] for i in index]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, i in enumerate(index):
        r = torch.from_numpy(ts.ids[i].astype(np.int64))
        ids[b, : len(r)] = r
        mask[b, : len(r)] = 1
        labels[b, : len(r)] = torch.where(torch.from_numpy(ts.trained[i]), r, IGNORE)
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if ts.teacher is not None:  # cached teacher top-k per label token, in the row-major order of the labels
        out["teacher_logits"] = torch.from_numpy(np.concatenate([ts.teacher[i][0] for i in index])).float()
        out["teacher_ids"] = torch.from_numpy(np.concatenate([ts.teacher[i][1] for i in index])).long()
    if ts.ratings is not None:  # reward model on ratings: one score per example
        out["ratings"] = torch.from_numpy(ts.ratings[list(index)]).float()
    if ts.targets is not None:  # classification: one class index per example
        out["class_labels"] = torch.tensor([ts.targets[i] for i in index], dtype=torch.long)
    return out


def collate_pairs(ts: TokenizedSet, index, pad_id: int) -> dict[str, torch.Tensor]:
    """Preference pairs: the chosen rows, then the rejected rows (B = 2 x pairs), plus `pairs` and, when
    computed, `reference` (pairs, 2) log-probs and, when the rows give them, `margins` (pairs,)."""
    index = list(index)
    assert ts.rejected is not None, "collate_pairs needs pairs: a TokenizedSet with its rejected side"
    both = TokenizedSet(
        [*(ts.ids[i] for i in index), *(ts.rejected.ids[i] for i in index)],
        [*(ts.trained[i] for i in index), *(ts.rejected.trained[i] for i in index)],
        [],
    )
    out = collate(both, range(2 * len(index)), pad_id)
    out["pairs"] = torch.tensor(len(index))
    if ts.reference is not None:
        out["reference"] = torch.from_numpy(ts.reference[index]).float()
    if ts.margins is not None:
        out["margins"] = torch.from_numpy(ts.margins[index]).float()
    return out
