"""One optimizer step, the same for every task: accumulate -> sum over processes -> clip -> step or skip.

`fit` (training/loop.py) takes one per step over its micro-batches; the rollout loop
(training/rl_loop.py) takes one per mini-batch of a rollout. Both hand it an objective's micro-batches
(methods/objective.py): each micro-batch's loss *sum* is back-propagated, and the gradients (summed over
the processes, when there are several) are divided by the count of the whole step over all of them,
so they are those of the mean over every unit of the step (label tokens, pairs, reply tokens), however
it was split into micro-batches and processes. The step is taken only when the loss and the gradient
norm are finite; a skipped step is reported, and the loop books it (LoopState.count_skipped).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from strop.core import distributed, signals
from strop.core.device import autocast, release_free_memory
from strop.methods.objective import Loss
from strop.training import sharding
from strop.training.checkpoint import restore_rng, rng_snapshot
from strop.training.loop_state import LoopState


class Scored(Protocol):
    """What a step needs of an objective (methods/objective.py): the loss sum of a micro-batch, its
    count of units and its statistics' sums; rollout objectives (methods/rl.py) have nothing else."""

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> Loss: ...


@dataclass
class Step:
    """What one optimizer step did, totals of all processes."""

    loss: float  # mean over the step's units (nan when it had none)
    count: int  # the units: the denominator of the gradients and of `stats`
    stats: dict[str, float]  # sums over the units of the objective's statistics
    real_tokens: int  # non-padding tokens the micro-batches held
    grad_norm: float  # before clipping
    taken: bool  # False: the loss or the gradient norm was not finite and the step was skipped


def optimizer_step(
    run: LoopState,
    model: torch.nn.Module,
    objective: Scored,
    micro: list[tuple[dict, int] | None],
    device: torch.device,
    grad_clip: float | None,
    autocast_dtype: torch.dtype | None = None,
    release_memory: bool = False,
    filler: Callable[[], dict] | None = None,
    interruptible: bool = True,
) -> Step:
    """Accumulate `objective.loss(model, batch)` over `micro` ((batch, real tokens) per micro-batch, None
    for an empty share) into the gradients of `run.modules` (the model, and an RL value head), clip their norm to `grad_clip` (None: no clipping; sharded modules clip
    over every process's rows) and step `run.optimizer` when finite; the gradients are cleared either
    way. `interruptible`: a stop signal abandons the step (`accumulate`); the rollout loop, whose steps
    are several updates of one rollout, checks for signals between rollouts instead."""
    loss, count, stats, real = accumulate(
        run, model, objective, micro, device, autocast_dtype, release_memory, filler, interruptible
    )
    params = [p for p in run.modules.parameters() if p.grad is not None]
    max_norm = grad_clip or float("inf")
    if run.sharded:
        grad_norm = sharding.clip_gradients(params, max_norm)
    else:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    taken = math.isfinite(loss) and math.isfinite(grad_norm)
    if taken:
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return Step(loss, count, stats, real, grad_norm, taken)


def accumulate(
    run: LoopState,
    model: torch.nn.Module,
    objective: Scored,
    micro: list[tuple[dict, int] | None],
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    release_memory: bool = False,
    filler: Callable[[], dict] | None = None,
    interruptible: bool = True,
) -> tuple[float, int, dict[str, float], int]:
    """One optimizer step's gradients: each micro-batch's loss sum back-propagated, then the gradients
    (summed over the processes, when there are several) divided by the step's count over all of them,
    so they are those of the mean over every unit of the step, however it was split. Returns (mean loss,
    count, stat sums, real tokens), totals of all processes. A stop signal (on any process) abandons the
    step: its gradients are dropped and its RNG draws undone before the checkpoint. `filler`: the batch
    a process runs with weight 0 for an empty share, to join every block's collectives (sharded runs)
    and to name the statistics it sums with the other processes."""
    stats: dict[str, float] = {}
    loss_sum, count, n_real, at_start = 0.0, 0, 0, rng_snapshot()
    for picked in micro:
        if interruptible and distributed.any_true(bool(signals.requested()), device):
            run.optimizer.zero_grad(set_to_none=True)
            restore_rng(at_start)
            run.stop_on_signal()
        empty = picked is None  # this process's share of the micro-batch is empty
        if empty:
            if filler is None:
                continue
            picked = filler(), 0
        batch, real = picked  # type: ignore[misc]
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        with autocast(device, autocast_dtype):
            out = objective.loss(model, batch)
        if empty:  # a filler: its collectives and its statistics' names, none of its gradient or values
            (out.total * 0.0).backward()
            stats |= {name: stats.get(name, 0.0) for name in out.stats}
            continue
        for name, v in out.stats.items():
            stats[name] = stats.get(name, 0.0) + v
        out.total.backward()
        loss_sum += float(out.total.detach())
        count += out.count
        n_real += real
        if device.type == "cpu" and release_memory:
            release_free_memory()  # resident memory drops back to what is live between micro-batches
    if distributed.WORLD.active:  # sharded blocks summed theirs in backward (reduce-scatter)
        whole = [p for p in run.modules.parameters() if p.requires_grad and not sharding.is_sharded(p)]
        distributed.sum_gradients(whole, device)
        names = run.stat_names = sorted(stats) or run.stat_names  # an empty share has no stats of its own
        totals = distributed.sum_floats(
            [loss_sum, count, n_real, *(stats.get(k, 0.0) for k in names)], device
        )
        loss_sum, count, n_real = totals[0], int(totals[1]), int(totals[2])
        stats = dict(zip(names, totals[3:], strict=True))
    for p in run.modules.parameters():
        if p.grad is not None:
            p.grad.div_(count or math.nan)
    return (loss_sum / count if count else math.nan), count, stats, n_real
