"""Curriculum learning: train on the easiest examples first and let harder ones in as training goes on.

Competence-based curriculum (Platanios et al. 2019, "Competence-based Curriculum Learning for Neural
Machine Translation", https://arxiv.org/abs/1903.09848). Examples are ranked by a difficulty score
(token count, or the base model's per-example loss computed elsewhere); at optimizer step t the model's
competence c(t) in [start, 1] grows from `start` to 1 by step `full_at`, and each micro-batch is drawn
uniformly from the easiest ceil(c(t) * n) examples. From `full_at` on the run is an ordinary shuffled
one (every example once per epoch), the same as `BatchPlan` / `PackedPlan`.

Like those plans, micro-batch m is a pure function of (seed, m), so a resumed run needs only the step.
"""

from __future__ import annotations

import math

import numpy as np

from strop.core.errors import ConfigError
from strop.data.batches import BatchPlan
from strop.data.packing import PackedPlan
from strop.data.tokenized import TokenizedSet

PACINGS = ("linear", "root")


def competence(step: int, start: float, full_at: int, pacing: str = "root") -> float:
    """The fraction of the data (easiest first) in the sampling pool at optimizer step `step`.

    linear: start + (1 - start) * t / full_at; root: sqrt(start^2 + (1 - start^2) * t / full_at), which
    spends less time on the few easiest examples. Both reach 1 at `full_at` and stay there.
    """
    _check(start, full_at, pacing)
    progress = min(step / full_at, 1.0)
    if pacing == "linear":
        return min(1.0, start + (1 - start) * progress)
    return min(1.0, math.sqrt(start**2 + (1 - start**2) * progress))


def difficulty_by_length(ts: TokenizedSet) -> np.ndarray:
    """(n,) token count per example: longer is harder."""
    return np.asarray([len(x) for x in ts.ids], dtype=np.int64)


class CurriculumPlan:
    """Micro-batches drawn from a growing pool of the easiest examples; the loop's BatchPlan interface.

    Padded (`batch_size`): `micro_batch(m)` is an array of up to `batch_size` distinct example indices.
    Packed (`budget`): a list holding one row, examples drawn from the pool in a seeded order, each
    added while it still fits in `budget` tokens. Micro-batch m belongs to optimizer step m // grad_accum.
    `per_epoch` is what the shuffled plan would have, so a run's length in epochs means the same.
    """

    def __init__(
        self,
        difficulty: np.ndarray,
        lengths: list[int],
        seed: int,
        grad_accum: int,
        start: float,
        full_at: int,
        pacing: str,
        batch_size: int | None = None,
        budget: int | None = None,
    ):
        _check(start, full_at, pacing)
        if (batch_size is None) == (budget is None):
            raise ValueError("CurriculumPlan: give exactly one of batch_size (padded) or budget (packed)")
        if len(difficulty) != len(lengths) or not len(lengths):
            raise ValueError(f"CurriculumPlan: {len(difficulty)} difficulties for {len(lengths)} examples")
        if grad_accum < 1:
            raise ValueError(f"CurriculumPlan: grad_accum must be >= 1, got {grad_accum}")
        self.lengths, self.seed, self.grad_accum = list(lengths), seed, grad_accum
        self.start, self.full_at, self.pacing = start, full_at, pacing
        self.batch_size, self.budget = batch_size, budget
        self.order = np.argsort(np.asarray(difficulty), kind="stable")  # easiest first, ties by index
        if budget is None:
            assert batch_size is not None  # exactly one of the two (checked above)
            self._after: BatchPlan | PackedPlan = BatchPlan(len(lengths), batch_size, seed)
        else:
            self._after = PackedPlan(self.lengths, budget, seed)
        self.per_epoch = self._after.per_epoch

    def pool_size(self, step: int) -> int:
        """How many of the easiest examples optimizer step `step` samples from."""
        n = len(self.lengths)
        c = competence(step, self.start, self.full_at, self.pacing)
        return min(n, max(1, math.ceil(round(c * n, 9))))  # round: 0.3 * 10 must give 3, not 4

    def micro_batch(self, m: int) -> np.ndarray | list[list[int]]:
        """Example indices of the run's m-th micro-batch (0-based, counting across epochs)."""
        ramp = self.full_at * self.grad_accum  # micro-batches before competence reaches 1
        if m >= ramp:
            return self._after.micro_batch(m - ramp)
        pool = self.order[: self.pool_size(m // self.grad_accum)]
        rng = np.random.default_rng([self.seed, m])
        if self.budget is None:
            assert self.batch_size is not None  # exactly one of the two (checked in __init__)
            if len(pool) <= self.batch_size:
                return rng.permutation(pool)
            return rng.choice(pool, self.batch_size, replace=False)
        row, room = [], self.budget
        for i in rng.permutation(pool):
            if self.lengths[i] <= room:
                row.append(int(i))
                room -= self.lengths[i]
                if room == 0:
                    break
        return [row]


def _check(start: float, full_at: int, pacing: str) -> None:
    if isinstance(start, bool) or not isinstance(start, (int, float)) or not 0 < start <= 1:
        raise ConfigError(f"data.curriculum.start: expected a fraction in (0, 1], got {start!r}")
    if isinstance(full_at, bool) or not isinstance(full_at, int) or full_at < 1:
        raise ConfigError(f"data.curriculum.full_at: expected an optimizer step >= 1, got {full_at!r}")
    if pacing not in PACINGS:
        raise ConfigError(f"data.curriculum.pacing: expected one of {', '.join(PACINGS)}, got {pacing!r}")
