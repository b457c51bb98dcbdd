"""Padding-free packing: several tokenized examples share one row, and no token attends across examples.

`pack` decides which examples share a row; `collate_packed` lays the rows out as tensors. A packed row
carries its example boundaries as cumulative segment lengths (`cu_seq_lens_q/k`, `max_length_q/k`, the
names transformers' flash-attention varlen path reads), plus `position_ids` that restart at 0 for each
example, so rotary and learned position embeddings see exactly what they see unpacked. The attention
that honours the boundaries is `strop.models.attention`.

Labels keep the unpacked meaning exactly: position t predicts labels[t + 1], and the first token of
every example is IGNORE, so the last token of one example never learns to predict the next example
(unpacked, position 0 of an example is never a target either).
"""

from __future__ import annotations

import bisect

import numpy as np
import torch

from strop.data.batches import IGNORE
from strop.data.tokenized import TokenizedSet

# What a packed batch passes to `model(...)`; `labels` stays with the loss. No attention_mask: padding is
# a segment of its own, and a 2-D mask would send flash-attention down its unpadding path instead.
MODEL_KEYS = ("input_ids", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def pack(lengths: list[int], budget: int) -> list[list[int]]:
    """Best-fit-decreasing bin packing: example indices grouped into rows of total length <= `budget`.

    Longest first (ties by index); each example goes into the open row it fills most tightly, or a new
    row. Deterministic. Rows are in the order they were opened; indices within a row in placement order.
    """
    if not lengths:
        return []
    if budget < max(lengths):
        raise ValueError(
            f"packing budget {budget} is shorter than the longest example ({max(lengths)} tokens); "
            "set the budget to at least data.max_length"
        )
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row number), sorted: the tightest fit is found by bisect
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        j = bisect.bisect_left(free, (n, -1))
        if j == len(free):
            rows.append([i])
            room, r = budget - n, len(rows) - 1
        else:
            room, r = free.pop(j)
            rows[r].append(i)
            room -= n
        bisect.insort(free, (room, r))
    return rows


def collate_packed(ts: TokenizedSet, rows: list[list[int]], pad_id: int) -> dict:
    """Packed rows as one batch, right-padded to the longest row.

    Returns tensors `input_ids`, `labels`, `position_ids` (R, L); `cu_seq_lens_q` = `cu_seq_lens_k`
    (S + 1,) int32, the segment boundaries over the flattened R * L tokens (every example is a segment,
    and so is the padding at the end of a row); and `max_length_q` = `max_length_k`, the longest segment,
    as a Python int (flash-attention wants an int there, so move only the tensors to the device).
    """
    row_lens = [sum(len(ts.ids[i]) for i in row) for row in rows]
    width = max(row_lens)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    seg_lens: list[int] = []
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            tokens = torch.from_numpy(ts.ids[i].astype(np.int64))
            n = len(tokens)
            ids[r, at : at + n] = tokens
            labels[r, at : at + n] = torch.where(torch.from_numpy(ts.trained[i]), tokens, IGNORE)
            labels[r, at] = IGNORE  # predicted from the previous example's last token: never a target
            positions[r, at : at + n] = torch.arange(n)
            seg_lens.append(n)
            at += n
        if at < width:  # the padding is a segment too, so no real token attends to it, nor it to them
            positions[r, at:] = torch.arange(width - at)
            seg_lens.append(width - at)
    cu = torch.zeros(len(seg_lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(seg_lens, dtype=torch.int32), 0)
    longest = max(seg_lens)
    return {
        "input_ids": ids,
        "labels": labels,
        "position_ids": positions,
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": longest,
        "max_length_k": longest,
    }


class PackedPlan:
    """Micro-batches of one packed row each, up to `budget` tokens, for a run: like `BatchPlan`,
    micro-batch `m` is a pure function of (seed, m), so resuming needs only the step number.

    Each epoch packs the examples in a seeded order (ties between equal lengths fall differently) and
    shuffles the rows. The row count is the same every epoch: best-fit-decreasing sees the same lengths.
    """

    def __init__(self, lengths: list[int], budget: int, seed: int):
        self.lengths, self.budget, self.seed = list(lengths), budget, seed
        self.per_epoch = len(pack(self.lengths, budget))
        self._cache: tuple[int, list[list[int]]] | None = None

    def micro_batch(self, m: int) -> list[list[int]]:
        """The rows (lists of example indices) of the run's m-th micro-batch."""
        epoch, j = divmod(m, self.per_epoch)
        if self._cache is None or self._cache[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(len(self.lengths))
            rows = [
                [int(order[k]) for k in row] for row in pack([self.lengths[i] for i in order], self.budget)
            ]
            self._cache = (epoch, [rows[r] for r in rng.permutation(len(rows))])
        return [self._cache[1][j]]


def collate_packed_pairs(ts: TokenizedSet, rows: list[list[int]], pad_id: int) -> dict:
    """Preference pairs packed: each row holds whole pairs, the chosen and the rejected side each a
    segment of its own. As `collate_packed`, plus `pairs` (n), `sequence_ids` (R, L): each token's
    sequence, numbered as `batches.collate_pairs` orders its rows (the chosen sides 0..n-1 in row
    order, then the rejected sides n..2n-1; -1 on padding), and `reference`/`margins` as there."""
    assert ts.rejected is not None, "a set of pairs has its rejected side"
    order = [i for row in rows for i in row]  # pair j of the batch is ts pair order[j]
    n = len(order)
    both = TokenizedSet(
        [*(ts.ids[i] for i in order), *(ts.rejected.ids[i] for i in order)],
        [*(ts.trained[i] for i in order), *(ts.rejected.trained[i] for i in order)],
        [],
    )
    seq_rows, j = [], 0
    for row in rows:
        seq_rows.append([k for jj in range(j, j + len(row)) for k in (jj, n + jj)])
        j += len(row)
    out = collate_packed(both, seq_rows, pad_id)
    sequence_ids = torch.full_like(out["input_ids"], -1)
    for r, seqs in enumerate(seq_rows):
        at = 0
        for k in seqs:
            sequence_ids[r, at : at + len(both.ids[k])] = k
            at += len(both.ids[k])
    out |= {"pairs": torch.tensor(n), "sequence_ids": sequence_ids}
    if ts.reference is not None:
        out["reference"] = torch.from_numpy(ts.reference[order]).float()
    if ts.margins is not None:
        out["margins"] = torch.from_numpy(ts.margins[order]).float()
    return out


def pair_lengths(ts: TokenizedSet) -> list[int]:
    """Tokens a pair takes in a packed row: both sides."""
    assert ts.rejected is not None
    return [len(c) + len(r) for c, r in zip(ts.ids, ts.rejected.ids, strict=True)]
