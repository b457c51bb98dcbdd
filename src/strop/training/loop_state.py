"""What both loops (`fit`, `fit_rl`) keep about a run in progress, in one place: the step counters
(state.json in every checkpoint), resuming them, seeding a fresh run, the metrics sink and the progress
bar, saving, stopping on a signal or on too many non-finite steps, and keeping the best weights."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import torch
from torch import nn

from strop.core import distributed, signals
from strop.core.errors import Interrupted, StropError, TrainingStopped
from strop.core.metrics import MetricsSink
from strop.core.progress import tqdm
from strop.training import sharding
from strop.training.checkpoint import (
    checkpoint_dir,
    load_weights,
    remove_partial_checkpoints,
    resume_latest,
    save_checkpoint,
    save_sharded_checkpoint,
)

log = logging.getLogger("strop.train")


class LoopState:
    """`state`: the counters a checkpoint holds (`step`, `best_step`, `skipped_steps`, ... and the
    loop's own); `final`: the latest logged metrics, prefilled from a resumed run's metrics.jsonl."""

    def __init__(
        self,
        run_dir: Path,
        modules: nn.Module,
        optimizer: torch.optim.Optimizer,
        state: dict,
        seed: int,
        keep_last: int,
        desc: str,
        show_progress: bool,
    ):
        self.run_dir, self.modules, self.optimizer, self.keep_last = run_dir, modules, optimizer, keep_last
        self.main = distributed.WORLD.main  # rank 0 alone writes the run folder, logs and shows progress
        self.sharded = sharding.model_is_sharded(modules)  # every process writes its rows of a checkpoint
        self.stat_names: list[str] = []  # the objective's statistics, summed over processes by name
        if self.main:
            run_dir.mkdir(parents=True, exist_ok=True)
            remove_partial_checkpoints(run_dir)
        distributed.barrier()
        self.state = {"step": 0, "finished": False, "best_step": None, "skipped_steps": 0, **state}
        resumed = resume_latest(run_dir, modules, optimizer)
        if resumed:
            _check_same_split(resumed[0], self.state, resumed[1])
            self.state.update(resumed[0])
            self.state.update(processes=state.get("processes", 1))
            log.info("resumed from %s (step %d of %d)", resumed[1], self.step, self.state["total_steps"])
        else:
            torch.manual_seed(seed)
            random.seed(seed)
        self.sink: MetricsSink | NoSink = (
            MetricsSink(run_dir, resume_step=self.step) if self.main else NoSink()
        )
        self.final: dict = {}
        for record in self.sink.kept:  # a resumed run reports its metrics so far, even with no step left
            self.final.update(record)
        self.bar = tqdm(
            total=self.state["total_steps"],
            initial=self.step,
            desc=desc,
            unit="step",
            disable=not (show_progress and self.main),
            dynamic_ncols=True,
        )

    @property
    def step(self) -> int:
        return self.state["step"]

    def save(self) -> Path:
        """Rank 0 writes the checkpoint (every process holds the same weights and optimizer state); the
        others wait until it is complete. Sharded, every process writes its rows."""
        path = checkpoint_dir(self.run_dir, self.step)
        if self.sharded:
            return save_sharded_checkpoint(
                self.run_dir, self.modules, self.optimizer, self.state, self.keep_last
            )
        if self.main:
            path = save_checkpoint(self.run_dir, self.modules, self.optimizer, self.state, self.keep_last)
        distributed.barrier()
        return path

    def log(self, record: dict, write: bool = True) -> None:
        """Keep `record` as the latest metrics, and write it to metrics.jsonl when `write`."""
        if write:
            self.sink.log(record)
        self.final.update(record)

    def count_skipped(self, skipped: int, updates: int, max_bad_steps: int) -> None:
        """Book the step just counted in `state["step"]`: `skipped` of its `updates` optimizer updates
        (one in `fit`; update_epochs x mini-batches in the rollout loop) had a non-finite loss or
        gradient and were skipped (training/step.py). A step with any counts in `skipped_steps` and is
        warned about; `max_bad_steps` steps in a row whose every update was skipped stop the run with a
        checkpoint."""
        state = self.state
        if skipped:
            state["skipped_steps"] += 1
            log.warning(
                "step %d: %d of %d updates had a non-finite loss or gradient; skipped",
                self.step,
                skipped,
                updates,
            )
        # a step with no update at all (dynamic sampling left nothing to learn from) is not a bad one
        state["bad_streak"] = state.get("bad_streak", 0) + 1 if updates and skipped == updates else 0
        if state["bad_streak"] >= max_bad_steps:
            what = "a non-finite loss" if updates == 1 else "only non-finite updates"
            self.stop_diverged(
                f"{state['bad_streak']} consecutive steps had {what}; stopped at step {self.step}."
            )

    def check_learned(self) -> None:
        """A run whose every step was skipped as non-finite learned nothing and is not a success."""
        if self.step and self.state["skipped_steps"] >= self.step:
            raise TrainingStopped(
                f"every one of the run's {self.step} steps had a non-finite loss or gradient and was "
                "skipped, so nothing was learned and no model is exported. Lower optim.lr, check the data, "
                "or use float32."
            )

    def stop_on_signal(self, saved: bool = False) -> None:
        """Close the bar and the metrics, write the checkpoint a stop signal asked for (unless the loop
        just saved this step) and raise `Interrupted`."""
        self.bar.close()
        self.sink.close()
        if not saved:
            self.save()
        raise Interrupted(signals.requested() or 0, f"checkpoint written at step {self.step}")

    def stop_diverged(self, message: str) -> None:
        """Save the counters (the weights are those of the last good step) and raise TrainingStopped
        with `message` and where the checkpoint is."""
        self.optimizer.zero_grad(set_to_none=True)
        self.bar.close()
        self.sink.close()
        path = self.save()
        raise TrainingStopped(f"{message} Checkpoint: {path}. {DIVERGED_ADVICE}")

    def close(self) -> None:
        """The end of the loop: a signal that came during the last step's evaluation or save finds all
        saved."""
        self.bar.close()
        self.sink.close()
        if signals.requested():
            self.stop_on_signal(saved=True)

    def keep_best(self, metric: str) -> bool:
        """Load the best step's weights when it is not the last step; True when it did."""
        best = self.state["best_step"]
        if (
            best is None
            or best == self.step
            or not (checkpoint_dir(self.run_dir, best) / "state.json").is_file()
        ):
            return False
        load_weights(checkpoint_dir(self.run_dir, best), self.modules)
        log.info("kept the best weights: step %d (%s %.4f)", best, metric, self.state[f"best_{metric}"])
        return True


class NoSink:
    """The metrics of a process other than rank 0: kept by rank 0 alone."""

    kept: list[dict] = []  # noqa: RUF012 - never written

    def log(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


def _check_same_split(saved: dict, now: dict, path: Path) -> None:
    """A run resumed by another number of processes goes on exactly when each optimizer step still takes
    the same micro-batches of the plan (training/loop._split); otherwise the data order from the
    checkpoint on would differ from the run it continues, so it is refused, saying what to set."""
    n_before, n_now = saved.get("processes", 1), now.get("processes", 1)
    before, after = saved.get("split"), now.get("split")
    if n_before == n_now or before is None or before == after:
        return
    if "examples_per_micro_batch" in before:
        key, total, per = "train.batch_size", before["examples_per_micro_batch"], "examples per micro-batch"
    else:
        key, total, per = (
            "train.grad_accum",
            before.get("plan_micro_batches_per_step", 1),
            "micro-batches per step",
        )
    hint = f"--set {key}={total // n_now}" if total % n_now == 0 else f"--nproc {n_before}"
    raise StropError(
        f"{path} was written by {n_before} process(es) taking {total} {per} in all; {n_now} process(es) "
        f"with this config take {next(iter(after.values())) if after else '?'}, which would change the data "
        f"order from here on. Resume with {hint} (or start a new run with --set name=NEW_NAME)"
    )


DIVERGED_ADVICE = "Lower optim.lr, check the data (and an RL reward for NaN), or use float32."
