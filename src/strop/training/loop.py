"""`fit`: the one training loop. accumulate -> clip -> step -> schedule -> log -> eval -> checkpoint.

Every method goes through it as an objective (methods/objective.py): its `loss` gives a micro-batch's
loss sum, its own count of units (label tokens, examples, pairs) and sums of statistics. The loop
back-propagates the sums and divides the gradients by the count of the whole optimizer step, so
accumulation never changes the result; the statistics are logged as means over the same count.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from strop.core import signals
from strop.core.config import OptimConfig, TrainConfig
from strop.core.device import autocast, release_free_memory
from strop.core.errors import ConfigError, Interrupted, TrainingStopped
from strop.core.metrics import MetricsSink
from strop.data.batches import BatchPlan
from strop.data.curriculum import CurriculumPlan
from strop.data.packing import PackedPlan, collate_packed
from strop.data.tokenized import TokenizedSet
from strop.methods.objective import Objective
from strop.training.checkpoint import (
    checkpoint_dir,
    load_weights,
    remove_partial_checkpoints,
    restore_rng,
    resume_latest,
    rng_snapshot,
    save_checkpoint,
)
from strop.training.optim import build_optimizer, lr_factor, set_lr

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
    """Micro-batch `m` of the run as tensors: padded examples (`batch_size`) or one packed row
    (`batch_tokens`), plus how many real (non-padding) tokens it holds."""

    def __init__(
        self,
        ts: TokenizedSet,
        train: TrainConfig,
        pad_id: int,
        collate,
        curriculum: Curriculum | None = None,
    ):
        self.ts, self.pad_id, self.collate = ts, pad_id, collate
        lengths = [len(x) for x in ts.ids]
        if train.batch_tokens:
            self.plan = PackedPlan(lengths, train.batch_tokens, train.seed)
        else:
            self.plan = BatchPlan(len(ts), train.batch_size, train.seed)
        self.packed = train.batch_tokens is not None
        if curriculum is not None:
            n_steps = total_steps(self.plan.per_epoch, train)
            c = curriculum
            full_at = max(1, round(c.full_at * n_steps) if c.full_at <= 1 else int(c.full_at))
            self.plan = CurriculumPlan(
                c.difficulty,
                lengths,
                train.seed,
                train.grad_accum,
                c.start,
                full_at,
                c.pacing,
                batch_size=None if self.packed else train.batch_size,
                budget=train.batch_tokens,
            )

    def __call__(self, m: int) -> tuple[dict, int]:
        picked = self.plan.micro_batch(m)
        if self.packed:
            return collate_packed(self.ts, picked, self.pad_id), sum(
                len(self.ts.ids[i]) for r in picked for i in r
            )
        return self.collate(self.ts, picked, self.pad_id), sum(len(self.ts.ids[i]) for i in picked)


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
) -> FitResult:
    """`val_groups`: validation indices by source (a mixture), each also scored as `val_loss/NAME`.
    `monitors`: further held-out sets (earlier stages' validation), scored as `val_loss/NAME` with the
    validation but never part of `val_loss`, so they watch forgetting without choosing checkpoints."""
    if train.batch_tokens and not objective.packs:
        raise ConfigError(f"train.batch_tokens: {type(objective).__name__} cannot train on packed rows")
    batches = MicroBatches(train_set, train, pad_id, objective.collate, curriculum)
    n_steps = total_steps(batches.plan.per_epoch, train)
    optimizer = build_optimizer(model, optim.name, optim.lr, optim.weight_decay, optim.betas, optim.momentum)
    val_batches = _validation_batches(val_set, train.batch_size, pad_id, device, objective.collate)
    group_batches = {
        name: _validation_batches(val_set.subset(index), train.batch_size, pad_id, device, objective.collate)
        for name, index in (val_groups or {}).items()
        if len(val_groups) > 1
    }
    group_batches |= {
        name: _validation_batches(s, train.batch_size, pad_id, device, objective.collate)
        for name, s in (monitors or {}).items()
    }

    run_dir.mkdir(parents=True, exist_ok=True)
    remove_partial_checkpoints(run_dir)
    state = {
        "step": 0,
        "best_val_loss": None,
        "best_step": None,
        "skipped_steps": 0,
        "evals_since_best": 0,
        "total_steps": n_steps,
        "finished": False,
    }
    resumed = resume_latest(run_dir, model, optimizer)
    if resumed:
        state.update(resumed[0])
        log.info("resumed from %s (step %d of %d)", resumed[1], state["step"], n_steps)
    else:
        torch.manual_seed(train.seed)
        random.seed(train.seed)
    sink = MetricsSink(run_dir, resume_step=state["step"])
    final: dict = {}
    for record in sink.kept:  # a resumed run reports its metrics so far, even with no step left to train
        final.update(record)

    model.train()
    bar = tqdm(
        total=n_steps,
        initial=state["step"],
        desc="train",
        unit="step",
        disable=not show_progress,
        dynamic_ncols=True,
    )
    bad_streak, stop_early, t_last, tokens_since = 0, False, time.perf_counter(), 0
    t_start = t_last
    while state["step"] < n_steps and not stop_early:
        step = state["step"]
        micro = [batches(step * train.grad_accum + i) for i in range(train.grad_accum)]
        lr = optim.lr * lr_factor(step, n_steps, optim.schedule, optim.warmup_steps)
        set_lr(optimizer, lr)

        loss_sum, n_labels, stats, at_start = 0.0, 0, {}, rng_snapshot()
        for batch, n_real in micro:
            if signals.requested():  # abandon the unfinished step: its gradients are dropped, not applied
                optimizer.zero_grad(set_to_none=True)
                restore_rng(at_start)
                stop_on_signal(run_dir, model, optimizer, state, train.keep_last, closing=(bar, sink))
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            with autocast(device, autocast_dtype):
                out = objective.loss(model, batch)
            for name, v in out.stats.items():
                stats[name] = stats.get(name, 0.0) + v
            out.total.backward()
            loss_sum += float(out.total.detach())
            n_labels += out.count
            tokens_since += n_real
            if device.type == "cpu" and train.release_memory:
                release_free_memory()  # resident memory drops back to what is live between micro-batches
        loss = loss_sum / n_labels if n_labels else math.nan
        params = [p for p in model.parameters() if p.grad is not None]
        for p in params:  # the step's mean: its sums over the units of every micro-batch, over their count
            p.grad.div_(n_labels or math.nan)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, optim.grad_clip or float("inf")))

        state["step"] = step + 1
        if math.isfinite(loss) and math.isfinite(grad_norm):
            bad_streak = 0
            optimizer.step()
        else:
            bad_streak += 1
            state["skipped_steps"] += 1
            log.warning(
                "step %d: loss %s / grad norm %s is not finite; step skipped", step + 1, loss, grad_norm
            )
            if bad_streak >= train.max_bad_steps:
                optimizer.zero_grad(set_to_none=True)
                path = save_checkpoint(run_dir, model, optimizer, state, train.keep_last)
                sink.close()
                bar.close()
                raise TrainingStopped(
                    f"{bad_streak} consecutive steps had a non-finite loss; stopped at step {step + 1}. "
                    f"Checkpoint: {path}. Lower optim.lr, check the data, or use float32."
                )
        optimizer.zero_grad(set_to_none=True)

        now = time.perf_counter()
        record = {
            "step": step + 1,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "label_tokens": n_labels,
            "tokens_per_s": tokens_since / max(now - t_last, 1e-9),
            "elapsed_s": now - t_start,  # wall time of this fit() call, evaluation and saving included
            **{name: v / n_labels for name, v in stats.items()},
        }
        tokens_since = 0
        if (step + 1) % train.log_every == 0 or step + 1 == n_steps:
            sink.log(record)
        final.update(record)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
        bar.update(1)

        last = step + 1 == n_steps
        improved = False
        if val_batches and ((train.eval_every and (step + 1) % train.eval_every == 0) or last):
            with autocast(device, autocast_dtype):
                metrics = objective.evaluate(model, val_batches)
                for name, group in group_batches.items():
                    metrics[f"val_loss/{name}"] = objective.evaluate(model, group)["val_loss"]
            sink.log({"step": step + 1, **metrics})
            final.update(metrics)
            bar.write(f"step {step + 1}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            best = state["best_val_loss"]
            val = metrics["val_loss"]
            if math.isfinite(val) and (best is None or val < best - train.early_stopping.min_delta):
                state.update(best_val_loss=metrics["val_loss"], best_step=step + 1, evals_since_best=0)
                improved = True
            else:
                state["evals_since_best"] += 1
                patience = train.early_stopping.patience
                if patience and state["evals_since_best"] >= patience:
                    stop_early = True
                    bar.write(
                        f"early stopping: no improvement in {patience} evaluations; "
                        f"best val_loss {state['best_val_loss']:.4f} at step {state['best_step']}"
                    )
        state["finished"] = last or stop_early
        if improved or state["finished"] or (train.save_every and (step + 1) % train.save_every == 0):
            save_checkpoint(run_dir, model, optimizer, state, train.keep_last)
        t_last = time.perf_counter()  # evaluation and saving are not training throughput
    bar.close()
    sink.close()
    if signals.requested():  # the signal came during the last step's evaluation or save: all is saved
        stop_on_signal(run_dir, model, optimizer, state, train.keep_last, saved=True)
    if state["step"] and state["skipped_steps"] >= state["step"]:
        raise TrainingStopped(
            f"every one of the run's {state['step']} steps had a non-finite loss or gradient and was "
            "skipped, so nothing was learned and no model is exported. Lower optim.lr, check the data, "
            "or use float32."
        )

    if state["best_step"] is not None and state["best_step"] != state["step"]:
        best_dir = checkpoint_dir(run_dir, state["best_step"])
        if (best_dir / "state.json").is_file():
            load_weights(best_dir, model)
            log.info(
                "kept the best weights: step %d (val_loss %.4f)", state["best_step"], state["best_val_loss"]
            )
    return FitResult(
        state["step"], final, state["best_step"], state["best_val_loss"], state["skipped_steps"], stop_early
    )


def stop_on_signal(
    run_dir: Path,
    model: nn.Module,
    optimizer,
    state: dict,
    keep_last: int,
    saved: bool = False,
    closing: tuple = (),
) -> None:
    """Close the loop's progress bar and metrics (`closing`), write the checkpoint a stop signal asked
    for (unless the loop just saved this step) and raise `Interrupted`."""
    for c in closing:
        c.close()
    if not saved:
        save_checkpoint(run_dir, model, optimizer, state, keep_last)
    signum = signals.requested()
    raise Interrupted(signum, f"checkpoint written at step {state['step']}")


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
