"""What both loops (`fit`, `fit_rl`) keep about a run in progress, in one place: the step counters
(state.json in every checkpoint), resuming them, seeding a fresh run, the metrics sink and the progress
bar, saving, stopping on a signal or on too many non-finite steps, and keeping the best weights."""

from __future__ import annotations

import logging
import math
import random
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from strop.core import signals
from strop.core.errors import Interrupted, TrainingStopped
from strop.core.metrics import MetricsSink
from strop.training.checkpoint import (
    checkpoint_dir,
    load_weights,
    remove_partial_checkpoints,
    resume_latest,
    save_checkpoint,
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
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_partial_checkpoints(run_dir)
        self.state = {"step": 0, "finished": False, "best_step": None, "skipped_steps": 0, **state}
        resumed = resume_latest(run_dir, modules, optimizer)
        if resumed:
            self.state.update(resumed[0])
            log.info("resumed from %s (step %d of %d)", resumed[1], self.step, self.state["total_steps"])
        else:
            torch.manual_seed(seed)
            random.seed(seed)
        self.sink = MetricsSink(run_dir, resume_step=self.step)
        self.final: dict = {}
        for record in self.sink.kept:  # a resumed run reports its metrics so far, even with no step left
            self.final.update(record)
        self.bar = tqdm(
            total=self.state["total_steps"],
            initial=self.step,
            desc=desc,
            unit="step",
            disable=not show_progress,
            dynamic_ncols=True,
        )

    @property
    def step(self) -> int:
        return self.state["step"]

    def save(self) -> Path:
        return save_checkpoint(self.run_dir, self.modules, self.optimizer, self.state, self.keep_last)

    def log(self, record: dict, write: bool = True) -> None:
        """Keep `record` as the latest metrics, and write it to metrics.jsonl when `write`."""
        if write:
            self.sink.log(record)
        self.final.update(record)

    def step_or_skip(self, loss: float, grad_norm: float, max_bad_steps: int) -> None:
        """The optimizer steps on a finite loss and gradient; otherwise the step is skipped, counted and
        warned about, and `max_bad_steps` skipped in a row stop the run with a checkpoint."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.state["bad_streak"] = 0
            self.optimizer.step()
        else:
            self.state["bad_streak"] = self.state.get("bad_streak", 0) + 1
            self.state["skipped_steps"] += 1
            log.warning(
                "step %d: loss %s / grad norm %s is not finite; step skipped", self.step, loss, grad_norm
            )
            if self.state["bad_streak"] >= max_bad_steps:
                self.stop_diverged(
                    f"{self.state['bad_streak']} consecutive steps had a non-finite loss; stopped at step "
                    f"{self.step}."
                )
        self.optimizer.zero_grad(set_to_none=True)

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


DIVERGED_ADVICE = "Lower optim.lr, check the data (and an RL reward for NaN), or use float32."
