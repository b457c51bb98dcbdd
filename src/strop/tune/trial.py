"""One trial: an ordinary `strop train` run in `RUN_DIR/trials/NNN/`, in its own process (so no memory,
threads or CUDA state carry over between trials), followed through its metrics.jsonl.

Each validation the run logs is reported to the study; when the pruner says stop, the run gets SIGTERM
and stops at its next safe point, as any signalled run does. The trial's value is read from the
finished run: the best step's validation metric, or its end-of-run evaluation.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import optuna

from strop.core import signals
from strop.core.errors import StropError

POLL_S = 0.25


@dataclass
class Objective:
    """What a trial is scored on. `intermediate`: the validation key reported for pruning, its sign
    flipped (`sign` -1) when the study maximises an objective measured only at the end."""

    name: str
    direction: Literal["minimize", "maximize"]
    intermediate: str
    sign: float

    @classmethod
    def of(cls, name: str, direction: Literal["minimize", "maximize"]) -> Objective:
        if name.startswith("val_"):
            return cls(name, direction, name, 1.0)
        return cls(name, direction, "val_loss", -1.0 if direction == "maximize" else 1.0)


@dataclass
class Progress:
    """What a running trial has done so far, for the progress line."""

    step: int = 0
    total: int | None = None
    elapsed: float | None = None  # seconds the training loop has run (no start-up, no export)
    last: dict = field(default_factory=dict)


class TrialFailed(StropError):
    """The trial's run ended with an error; the message is its own `error:` line."""


class TrialInterrupted(Exception):
    """The search itself was asked to stop while the trial ran."""


@dataclass
class TrialOutcome:
    state: str  # complete | pruned
    value: float | None
    steps: int
    total_steps: int | None
    seconds: float
    train_seconds: float | None


class TrialRunner:
    """Runs trials as child processes; `stop()` (from a signal handler) ends every running one."""

    def __init__(self, objective: Objective):
        self.objective = objective
        self.running: dict[int, subprocess.Popen] = {}
        self.progress: dict[int, Progress] = {}
        self.stopping = False
        self._lock = threading.Lock()

    def stop(self, signum: int = signal.SIGTERM) -> None:
        self.stopping = True
        with self._lock:
            for child in self.running.values():
                _signal(child, signum)

    def run(self, trial: optuna.Trial, config: Path, run_dir: Path) -> TrialOutcome:
        t0 = time.time()
        log_path = run_dir / "log.txt"
        progress = self.progress[trial.number] = Progress()
        with open(log_path, "ab") as log_file:
            cmd = [sys.executable, "-m", "strop", "train", str(config), "--no-progress"]
            with self._lock:
                if self.stopping:
                    raise TrialInterrupted
                child = subprocess.Popen(
                    cmd,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,  # signals reach it from this process only, exactly once
                    env={**os.environ, signals.PARENT_ENV: str(os.getpid())},
                )
                self.running[trial.number] = child
            try:
                pruned = self._follow(trial, child, run_dir / "metrics.jsonl", progress)
            finally:
                with self._lock:
                    self.running.pop(trial.number, None)
                self.progress.pop(trial.number, None)
        seconds = time.time() - t0
        if self.stopping and child.returncode != 0:
            raise TrialInterrupted
        if pruned:
            return TrialOutcome("pruned", None, progress.step, progress.total, seconds, progress.elapsed)
        if child.returncode != 0:
            raise TrialFailed(_error_line(log_path, child.returncode))
        value = read_value(run_dir, self.objective.name)
        return TrialOutcome("complete", value, progress.step, progress.total, seconds, progress.elapsed)

    def _follow(self, trial: optuna.Trial, child: subprocess.Popen, metrics: Path, p: Progress) -> bool:
        """Report each validation until the run ends; True when the pruner stopped it."""
        offset, pruned, reported = 0, False, set()
        while True:
            done = child.poll() is not None
            records, offset = _new_records(metrics, offset)
            for r in records:
                if "loss" in r and "step" in r:
                    p.step, p.total = int(r["step"]), r.get("total_steps", p.total)
                    p.elapsed = r.get("elapsed_s", p.elapsed)
            trained = p.total is not None and p.step >= p.total  # only the export is left: let it finish
            for r in records:
                value = r.get(self.objective.intermediate)
                if value is None or pruned or not math.isfinite(value) or r["step"] in reported:
                    continue
                p.last = r
                reported.add(r["step"])
                trial.report(self.objective.sign * float(value), int(r["step"]))
                if not done and not trained and trial.should_prune():
                    pruned = True
                    _signal(child, signal.SIGTERM)
            if done:
                return pruned and child.returncode != 0
            time.sleep(POLL_S)


def read_value(run_dir: Path, name: str) -> float:
    """The objective of a finished trial run. `val_*`: the value logged at the best step (the model the
    run kept), `val_loss` from result.json; other names: its evaluation summary."""
    result = _read_json(run_dir / "result.json")
    metrics = result.get("metrics", {})
    if name == "val_loss" and metrics.get("best_val_loss") is not None:
        return float(metrics["best_val_loss"])
    if name.startswith("val_"):
        best = metrics.get("best_step")
        records = [r for r in _read_jsonl(run_dir / "metrics.jsonl") if name in r]
        at_best = [r for r in records if r.get("step") == best] or records[-1:]
        if at_best:
            return float(at_best[-1][name])
        seen = sorted({k for r in _read_jsonl(run_dir / "metrics.jsonl") for k in r if k.startswith("val_")})
        raise TrialFailed(
            f"search.objective: {name} is not logged by this run's validation (it logs "
            f"{', '.join(seen) or 'no validation metrics: give the run a validation set'})"
        )
    summary = _read_json(run_dir / "eval" / "summary.json")
    found = summary.get("metrics", {})
    if name in found:
        m = found[name]
        return float(m["tuned"] if isinstance(m, dict) else m)
    raise TrialFailed(
        f"search.objective: {name} is not among the run's evaluation metrics "
        f"({', '.join(sorted(found)) or 'none: the run evaluated nothing'}); name a val_* metric or set "
        "eval.metrics"
    )


def _new_records(path: Path, offset: int) -> tuple[list[dict], int]:
    """Complete lines appended since `offset` (a line still being written waits for the next poll)."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            chunk = f.read()
    except FileNotFoundError:
        return [], offset
    end = chunk.rfind(b"\n") + 1
    out = []
    for line in chunk[:end].splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out, offset + end


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _read_jsonl(path: Path) -> list[dict]:
    return _new_records(path, 0)[0]


def _error_line(log: Path, code: int) -> str:
    try:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        lines = []
    errors = [ln for ln in lines if ln.startswith("error:")]
    if errors:
        return errors[-1][len("error:") :].strip()
    tail = lines[-1] if lines else "no output"
    return f"exit status {code}: {tail} (see {log})"


def _signal(child: subprocess.Popen, signum: int) -> None:
    try:
        child.send_signal(signum)
    except ProcessLookupError:
        pass
