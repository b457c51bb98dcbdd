"""`fit`: the one training loop. accumulate -> clip -> step -> schedule -> log -> eval -> checkpoint.

Every method goes through it as an objective (methods/objective.py): its `loss` gives a micro-batch's
loss sum, its own count of units (label tokens, examples, pairs) and sums of statistics. The optimizer
step (training/step.py, shared with the rollout loop) back-propagates the sums and divides the
gradients by the count of the whole step, so accumulation never changes the result; the statistics are
logged as means over the same count.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from strop.core import distributed, signals
from strop.core.config import OptimConfig, TrainConfig
from strop.core.device import autocast, release_free_memory
from strop.core.distributed import World
from strop.core.errors import ConfigError
from strop.data.batches import BatchPlan
from strop.data.curriculum import CurriculumPlan
from strop.data.packing import PackedPlan
from strop.data.tokenized import TokenizedSet
from strop.methods.objective import Objective
from strop.training import memory, sharding
from strop.training.checkpoint import restore_rng, rng_snapshot
from strop.training.loop_state import LoopState
from strop.training.optim import build_optimizer, lr_factor, set_lr
from strop.training.step import optimizer_step

log = logging.getLogger("strop.train")


@dataclass
class FitResult:
    steps: int
    final: dict  # last logged training metrics and last validation metrics
    best_step: int | None
    best_val_loss: float | None
    skipped_steps: int
    stopped_early: bool


def total_steps(micro_per_epoch: int, train: TrainConfig) -> int:
    if train.max_steps:
        return train.max_steps
    return max(1, math.ceil(train.epochs * micro_per_epoch / train.grad_accum))


@dataclass(frozen=True)
class Curriculum:
    """Easy-to-hard sampling (strop.data.curriculum): a difficulty per training example and the pacing."""

    difficulty: np.ndarray
    start: float
    full_at: float  # a fraction (<= 1) of the run's steps, or a step number
    pacing: str


class MicroBatches:
    """Micro-batch `m` of this process as tensors: padded examples (`batch_size`) or one packed row
    (`batch_tokens`), plus how many real (non-padding) tokens it holds; None when this process's share
    is empty (the last micro-batch of an epoch, split over more processes than it has examples).

    Under N processes (core/distributed.py) the plan is that of the global batch, a pure function of
    (seed, m, rank, N): padded micro-batches of N x `batch_size` examples are cut into N contiguous
    shares, one per rank, so N x `batch_size` b is the micro-batch N*b of one process; packed rows and
    curriculum micro-batches are dealt round-robin (rank r takes micro-batch m*N + r), so N processes
    with accumulation a take the micro-batches one process takes with accumulation a*N. Every example
    is used once per epoch across the processes."""

    def __init__(
        self,
        ts: TokenizedSet,
        train: TrainConfig,
        pad_id: int,
        objective: Objective,
        curriculum: Curriculum | None = None,
        world: World = distributed.SINGLE,
    ):
        self.ts, self.pad_id, self.objective, self.world = ts, pad_id, objective, world
        self.lengths = lengths = objective.lengths(ts)
        self.plan: BatchPlan | PackedPlan | CurriculumPlan
        self.packed = train.batch_tokens is not None
        self.dealt = self.packed or curriculum is not None  # round-robin, else cut into shares
        if train.batch_tokens:
            self.plan = PackedPlan(lengths, train.batch_tokens, train.seed)
        else:
            self.plan = BatchPlan(len(ts), train.batch_size * (1 if self.dealt else world.size), train.seed)
        if curriculum is not None:
            n_steps = total_steps(math.ceil(self.plan.per_epoch / world.size), train)
            c = curriculum
            full_at = max(1, round(c.full_at * n_steps) if c.full_at <= 1 else int(c.full_at))
            self.plan = CurriculumPlan(
                c.difficulty,
                lengths,
                train.seed,
                train.grad_accum * world.size,
                c.start,
                full_at,
                c.pacing,
                batch_size=None if self.packed else train.batch_size,
                budget=train.batch_tokens,
            )

    @property
    def per_epoch(self) -> int:
        """Micro-batches per epoch of each process."""
        return math.ceil(self.plan.per_epoch / self.world.size) if self.dealt else self.plan.per_epoch

    def __call__(self, m: int) -> tuple[dict, int] | None:
        n, rank = self.world.size, self.world.rank
        picked = self.plan.micro_batch(m * n + rank if self.dealt else m)
        if isinstance(picked, list):  # packed plans (self.packed) give rows: lists of example indices
            real = sum(self.lengths[i] for r in picked for i in r)
            return self.objective.collate_packed(self.ts, picked, self.pad_id), real
        if not self.dealt and n > 1:
            picked = np.array_split(picked, n)[rank]
            if len(picked) == 0:
                return None
        return self.objective.collate(self.ts, picked, self.pad_id), sum(self.lengths[i] for i in picked)

    def filler(self) -> dict:
        """A one-example batch a sharded process runs with weight 0 when its share is empty: every
        process must take part in each block's gathers and reductions."""
        return self.objective.collate(self.ts, np.array([0]), self.pad_id)


@signals.deferring
def fit(
    model: nn.Module,
    objective: Objective,
    train_set: TokenizedSet,
    val_set: TokenizedSet | None,
    train: TrainConfig,
    optim: OptimConfig,
    run_dir: Path,
    pad_id: int,
    device: torch.device,
    show_progress: bool = True,
    autocast_dtype: torch.dtype | None = None,
    curriculum: Curriculum | None = None,
    val_groups: dict[str, list[int]] | None = None,
    monitors: dict[str, TokenizedSet] | None = None,
    lr_ratios: dict[str, float] | None = None,
) -> FitResult:
    """`val_groups`: validation indices by source (a mixture), each also scored as `val_loss/NAME`.
    `monitors`: further held-out sets (earlier stages' validation), scored as `val_loss/NAME` with the
    validation but never part of `val_loss`, so they watch forgetting without choosing checkpoints."""
    if train.batch_tokens and not objective.packs:
        raise ConfigError(f"train.batch_tokens: {type(objective).__name__} cannot train on packed rows")
    world = distributed.WORLD
    if world.size > len(train_set):
        raise ConfigError(
            f"{world.size} processes and {len(train_set)} training examples: every process needs at least one"
        )
    if train.memory_limit is not None:
        train = _within_memory(model, objective, train_set, train, run_dir, pad_id, device)
    batches = MicroBatches(train_set, train, pad_id, objective, curriculum, world)
    n_steps = total_steps(batches.per_epoch, train)
    sharded = train.parallel == "fsdp" and world.active
    if sharded:  # before the optimizer, which then holds the shards
        n_blocks = sharding.shard(model, device)
        log.info("fsdp: %d blocks sharded over %d processes", n_blocks, world.size)
        if device.type == "cpu":
            release_free_memory()  # the whole weights each process loaded before sharding go back
    optimizer = build_optimizer(
        model, optim.name, optim.lr, optim.weight_decay, optim.betas, optim.momentum, lr_ratios
    )
    validation = Validation(objective, val_set, val_groups, monitors, train.batch_size, pad_id, device)
    counters: dict = {"best_val_loss": None, "evals_since_best": 0, "bad_streak": 0, "total_steps": n_steps}
    counters["processes"] = world.size  # a resume with another count is checked against it (LoopState)
    counters["split"] = _split(train, world, batches.dealt)
    run = LoopState(run_dir, model, optimizer, counters, train.seed, train.keep_last, "train", show_progress)

    model.train()
    stop_early, t_last = False, time.perf_counter()
    t_start = t_last
    while run.step < n_steps and not stop_early:
        step = run.step
        lr = optim.lr * lr_factor(step, n_steps, optim.schedule, optim.warmup_steps)
        set_lr(optimizer, lr)
        micro = [batches(step * train.grad_accum + i) for i in range(train.grad_accum)]
        done = optimizer_step(
            run,
            model,
            objective,
            micro,
            device,
            optim.grad_clip,
            autocast_dtype,
            train.release_memory,
            batches.filler if sharded else None,
        )
        loss, n_labels, grad_norm = done.loss, done.count, done.grad_norm
        run.state["step"] = step + 1
        run.count_skipped(0 if done.taken else 1, 1, train.max_bad_steps)

        now = time.perf_counter()
        record = {
            "step": step + 1,
            "total_steps": n_steps,  # the run's plan, for whoever follows metrics.jsonl (strop tune)
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "label_tokens": n_labels,
            "tokens_per_s": done.real_tokens / max(now - t_last, 1e-9),
            "elapsed_s": now - t_start,  # wall time of this fit() call, evaluation and saving included
            **{name: v / n_labels for name, v in done.stats.items()},
        }
        last = step + 1 == n_steps
        run.log(record, write=(step + 1) % train.log_every == 0 or last)
        run.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
        run.bar.update(1)

        improved = False
        if validation and ((train.eval_every and (step + 1) % train.eval_every == 0) or last):
            with autocast(device, autocast_dtype):
                improved, stop_early = validation.score(model, run, train.early_stopping)
        run.state["finished"] = last or stop_early
        if improved or run.state["finished"] or (train.save_every and (step + 1) % train.save_every == 0):
            run.save()
        t_last = time.perf_counter()  # evaluation and saving are not training throughput
    run.close()
    run.check_learned()
    run.keep_best("val_loss")
    st = run.state
    return FitResult(
        st["step"],
        run.final,
        st["best_step"],
        st["best_val_loss"],
        st["skipped_steps"],
        stop_early,
    )


def _split(train: TrainConfig, world: World, dealt: bool) -> dict:
    """What one optimizer step takes from the plan, whatever the number of processes: the examples of a
    padded micro-batch over all processes and the micro-batches per step, or (packed rows, curriculum)
    the plan's micro-batches per step. A resume by another number of processes must keep it."""
    if dealt:
        return {"plan_micro_batches_per_step": train.grad_accum * world.size}
    return {"examples_per_micro_batch": train.batch_size * world.size, "grad_accum": train.grad_accum}


class Validation:
    """Held-out scoring during `fit`: the validation batches (built once, sorted by length), those of
    each mixture source and of each monitored set; keep-best and early stopping on `val_loss`."""

    def __init__(self, objective, val_set, val_groups, monitors, batch_size: int, pad_id: int, device):
        self.objective = objective

        def batches(ts):
            return _validation_batches(ts, batch_size, pad_id, device, objective.collate)

        self.batches = batches(val_set)
        groups = val_groups or {}
        self.groups = {name: batches(val_set.subset(i)) for name, i in groups.items() if len(groups) > 1}
        self.groups |= {name: batches(s) for name, s in (monitors or {}).items()}

    def __bool__(self) -> bool:
        return bool(self.batches)

    def score(self, model: nn.Module, run: LoopState, stopping) -> tuple[bool, bool]:
        """Score and log; returns (a new best val_loss, time to stop early)."""
        metrics = self.objective.evaluate(model, self.batches)
        for name, group in self.groups.items():
            metrics[f"val_loss/{name}"] = self.objective.evaluate(model, group)["val_loss"]
        step, state = run.step, run.state
        run.log({"step": step, **metrics})
        run.bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        best, val = state["best_val_loss"], metrics["val_loss"]
        if math.isfinite(val) and (best is None or val < best - stopping.min_delta):
            state.update(best_val_loss=val, best_step=step, evals_since_best=0)
            return True, False
        state["evals_since_best"] += 1
        if stopping.patience and state["evals_since_best"] >= stopping.patience:
            run.bar.write(
                f"early stopping: no improvement in {stopping.patience} evaluations; "
                f"best val_loss {state['best_val_loss']:.4f} at step {state['best_step']}"
            )
            return False, True
        return False, False


def _validation_batches(
    val_set: TokenizedSet | None, batch_size: int, pad_id: int, device: torch.device, collate
) -> list[dict]:
    """Validation batches built once, sorted by length so little compute goes to padding."""
    if val_set is None or len(val_set) == 0:
        return []
    order = sorted(range(len(val_set)), key=lambda i: len(val_set.ids[i]))
    return [
        {k: v.to(device) for k, v in collate(val_set, order[i : i + batch_size], pad_id).items()}
        for i in range(0, len(order), batch_size)
    ]


def _within_memory(model, objective, train_set, train: TrainConfig, run_dir: Path, pad_id: int, device):
    """`train` with the micro-batch and accumulation that fit train.memory_limit (training/memory.py);
    the probe's passes leave no gradient and draw no random number the run would otherwise draw."""
    if distributed.WORLD.size > 1:
        raise ConfigError("train.memory_limit: not yet with several processes; set batch_size per process")
    at_start = rng_snapshot()
    choice = memory.fit_batch(
        train,
        run_dir,
        device,
        lambda: memory.probe(model, objective, train_set, objective.lengths(train_set), pad_id, device),
        model,
    )
    restore_rng(at_start)
    memory.keep(choice, run_dir)
    return train.model_copy(update={"batch_size": choice["micro_batch"], "grad_accum": choice["grad_accum"]})
