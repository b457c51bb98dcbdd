"""The objective protocol: everything the training loop (training/loop.py) needs from a method.

An objective is a small object with
- `loss(model, batch) -> Loss(total, count, stats)`: the loss *summed* over the micro-batch's units
  (label tokens, examples or pairs: the objective decides), how many units that is, and sums of the
  statistics to log per unit (DPO's reward accuracy, say);
- `evaluate(model, batches) -> {"val_loss": ..., ...}` on held-out batches;
- `collate(ts, index, pad_id) -> batch`: its batch type, built from a TokenizedSet;
- `needs`: what the recipe must supply before training: "reference" (the starting model's log-probs
  carried in the batches), "teacher" (a frozen teacher model or its cached logits);
- `packs`: whether it trains on packed rows (train.batch_tokens), then laid out by its `lengths` (the
  tokens an example takes in a row) and `collate_packed`.

The loop adds up the totals and counts of one optimizer step's micro-batches, back-propagates the
totals and divides the gradients by the step's count, so gradient accumulation never changes a step.
Loss variants are classes chosen by config (methods/pair_losses.py), never string special cases.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import torch

from strop.data.batches import collate
from strop.data.packing import collate_packed
from strop.data.tokenized import TokenizedSet


class Loss(NamedTuple):
    total: torch.Tensor  # summed over the micro-batch's units
    # how many units (the step's denominator is the sum of its micro-batches' counts); mypy rejects a
    # field that shadows tuple.count, Python does not, and callers read it by name or unpack it
    count: int  # type: ignore[assignment]
    stats: dict[str, float] = {}  # noqa: RUF012 - read only; sums over the units, logged as means


class Objective(Protocol):
    needs: frozenset[str]
    packs: bool

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> Loss: ...

    def evaluate(self, model: torch.nn.Module, batches: list[dict]) -> dict[str, float]: ...

    def collate(self, ts: TokenizedSet, index, pad_id: int) -> dict[str, Any]: ...

    def lengths(self, ts: TokenizedSet) -> list[int]: ...

    def collate_packed(self, ts: TokenizedSet, rows: list[list[int]], pad_id: int) -> dict[str, Any]: ...


class RowObjective:
    """Defaults for objectives over rows (data/batches.collate, data/packing.collate_packed): nothing
    needed; `packs` is False unless the objective can read packed rows."""

    needs: frozenset[str] = frozenset()
    packs = False

    def collate(self, ts: TokenizedSet, index, pad_id: int) -> dict[str, Any]:
        return collate(ts, index, pad_id)

    def lengths(self, ts: TokenizedSet) -> list[int]:
        """Tokens each example takes in a packed row."""
        return [len(x) for x in ts.ids]

    def collate_packed(self, ts: TokenizedSet, rows: list[list[int]], pad_id: int) -> dict[str, Any]:
        return collate_packed(ts, rows, pad_id)
