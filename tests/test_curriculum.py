"""Curriculum: the competence schedule, pools of the easiest examples, and resumable micro-batches."""

from __future__ import annotations

import math
from itertools import pairwise

import numpy as np
import pytest

from strop.core.errors import ConfigError
from strop.data.curriculum import CurriculumPlan, competence, difficulty_by_length
from strop.data.packing import pack
from strop.data.tokenized import TokenizedSet

N = 200
LENGTHS = [int(x) for x in np.random.default_rng(0).integers(4, 60, N)]
DIFFICULTY = np.random.default_rng(1).random(N)
EASIEST = np.argsort(DIFFICULTY, kind="stable")


def plan(packed: bool = False, **kw) -> CurriculumPlan:
    args = dict(seed=3, grad_accum=2, start=0.2, full_at=50, pacing="root")
    args.update(kw)
    size = {"budget": 128} if packed else {"batch_size": 8}
    return CurriculumPlan(DIFFICULTY, LENGTHS, **args, **size)


def indices(batch) -> list[int]:
    return [int(i) for i in batch] if isinstance(batch, np.ndarray) else [i for row in batch for i in row]


def test_competence_by_hand():
    assert competence(50, 0.2, 100, "linear") == pytest.approx(0.6)
    assert competence(50, 0.2, 100, "root") == pytest.approx(math.sqrt(0.04 + 0.96 * 0.5))
    for pacing in ("linear", "root"):
        assert competence(0, 0.2, 100, pacing) == pytest.approx(0.2)
        assert competence(100, 0.2, 100, pacing) == 1.0
        assert competence(10_000, 0.2, 100, pacing) == 1.0
    assert competence(50, 1.0, 100, "root") == 1.0


def test_difficulty_by_length():
    ts = TokenizedSet(
        [np.zeros(n, np.int32) for n in (3, 9, 1)], [np.ones(n, bool) for n in (3, 9, 1)], list("abc")
    )
    assert difficulty_by_length(ts).tolist() == [3, 9, 1]


@pytest.mark.parametrize("packed", [False, True])
def test_step_zero_draws_only_the_easiest(packed):
    p = plan(packed)
    easiest = set(EASIEST[: math.ceil(0.2 * N)].tolist())
    for m in range(p.grad_accum):  # every micro-batch of optimizer step 0
        assert set(indices(p.micro_batch(m))) <= easiest
    # and over the early steps, nothing outside the pool of each step
    for m in range(40):
        assert set(indices(p.micro_batch(m))) <= set(EASIEST[: p.pool_size(m // p.grad_accum)].tolist())


def test_pool_grows_monotonically_to_everything():
    p = plan(pacing="linear")
    sizes = [p.pool_size(t) for t in range(80)]
    assert sizes[0] == math.ceil(0.2 * N) and sizes[50:] == [N] * 30
    assert all(a <= b for a, b in pairwise(sizes))


@pytest.mark.parametrize("packed", [False, True])
def test_after_full_at_every_example_appears(packed):
    p = plan(packed)
    after = p.full_at * p.grad_accum
    seen = set()
    for m in range(after, after + p.per_epoch):  # one ordinary shuffled epoch
        seen |= set(indices(p.micro_batch(m)))
    assert seen == set(range(N))


@pytest.mark.parametrize("packed", [False, True])
def test_pure_function_of_seed_and_micro_batch(packed):
    a, b = plan(packed), plan(packed)
    ms = [0, 1, 37, 99, 100, 101, 250, 5]
    forward = [indices(a.micro_batch(m)) for m in ms]
    backward = [indices(b.micro_batch(m)) for m in reversed(ms)][::-1]
    assert forward == backward
    assert forward != [indices(plan(packed, seed=4).micro_batch(m)) for m in ms]


def test_padded_batches_are_distinct_and_full():
    p = plan()
    assert p.per_epoch == math.ceil(N / 8)
    for m in range(0, 300, 7):
        batch = p.micro_batch(m)
        assert len(batch) == 8 and len(set(batch.tolist())) == 8
    tiny = CurriculumPlan(DIFFICULTY, LENGTHS, 0, 1, start=0.01, full_at=10, pacing="linear", batch_size=8)
    assert sorted(tiny.micro_batch(0).tolist()) == sorted(EASIEST[:2].tolist())  # pool smaller than a batch


def test_packed_rows_fit_the_budget():
    p = plan(packed=True)
    assert p.per_epoch == len(pack(LENGTHS, 128))
    for m in range(0, 300, 3):
        rows = p.micro_batch(m)
        assert len(rows) == 1 and rows[0]
        assert len(set(rows[0])) == len(rows[0])
        assert sum(LENGTHS[i] for i in rows[0]) <= 128


@pytest.mark.parametrize("packed", [False, True])
def test_early_batches_are_easier_than_late(packed):
    p = plan(packed)
    early = [i for m in range(10) for i in indices(p.micro_batch(m))]
    late = [i for m in range(100, 200) for i in indices(p.micro_batch(m))]
    assert DIFFICULTY[early].mean() < DIFFICULTY[late].mean()


@pytest.mark.parametrize(
    "kw, key",
    [
        ({"start": 0.0}, "data.curriculum.start"),
        ({"start": 1.5}, "data.curriculum.start"),
        ({"full_at": 0}, "data.curriculum.full_at"),
        ({"pacing": "cubic"}, "data.curriculum.pacing"),
    ],
)
def test_bad_arguments_name_the_key(kw, key):
    with pytest.raises(ConfigError, match=key):
        plan(**kw)


def test_exactly_one_of_batch_size_or_budget():
    with pytest.raises(ValueError, match="exactly one"):
        CurriculumPlan(DIFFICULTY, LENGTHS, 0, 1, 0.2, 10, "root", batch_size=8, budget=128)
    with pytest.raises(ValueError, match="exactly one"):
        CurriculumPlan(DIFFICULTY, LENGTHS, 0, 1, 0.2, 10, "root")
