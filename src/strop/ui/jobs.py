"""Runs started from the dashboard: `strop train` child processes, as a user would start them.

A job is the command line, its log (`RUNS/.strop-ui/logs/NAME.log`: the child's stdout and stderr) and,
once it ends, its exit status, kept in `RUNS/.strop-ui/jobs/NAME.json` so a restarted dashboard still
tells a failed job from a stopped one. Stop sends SIGTERM, which `strop train` answers by finishing the
micro-batch and writing a checkpoint (core/signals.py); resume is `strop train --resume RUN_DIR`.
Children are started with STROP_PARENT_PID (as `strop tune` starts its trials): when the dashboard
ends, they get SIGTERM too and stop the same graceful way, instead of training unattended.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from strop.core import signals
from strop.core.errors import StropError
from strop.core.io import atomic_write_json

STATE = ".strop-ui"  # the dashboard's own folder inside the runs folder (dotted: never listed as a run)
INTERRUPTED = {128 + signal.SIGINT, 128 + signal.SIGTERM, -signal.SIGINT, -signal.SIGTERM}


@dataclass
class Job:
    run_id: str  # the run folder relative to the runs folder
    command: list[str]  # as shown to the user: `strop train ...`
    log: Path
    started: float
    task: str = ""
    model: str = ""
    method: str = ""
    returncode: int | None = None
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.returncode is None

    @property
    def stopped(self) -> bool:
        """Ended by SIGINT/SIGTERM: what it trained is in its last checkpoint."""
        return self.returncode in INTERRUPTED

    def error(self) -> str | None:
        """The child's `error:` line (or its last line) when it failed."""
        if self.returncode in (None, 0) or self.stopped:
            return None
        try:
            lines = [ln for ln in self.log.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            lines = []
        errors = [ln for ln in lines if ln.startswith("error:")]
        return (
            errors[-1] if errors else f"exit status {self.returncode}: {lines[-1] if lines else 'no output'}"
        )

    def record(self) -> dict:
        return {
            "run_id": self.run_id,
            "command": self.command,
            "log": str(self.log),
            "started": self.started,
            "task": self.task,
            "model": self.model,
            "method": self.method,
            "returncode": self.returncode,
        }


class Jobs:
    """The jobs of one runs folder, by run id."""

    def __init__(self, root: Path):
        self.root = root
        self.state = root / STATE
        self._lock = threading.Lock()
        self.jobs: dict[str, Job] = {}
        for path in sorted((self.state / "jobs").glob("*.json")):
            try:
                r = json.loads(path.read_text())
                job = Job(
                    r["run_id"],
                    r["command"],
                    Path(r["log"]),
                    r["started"],
                    r["task"],
                    r["model"],
                    r["method"],
                )
                job.returncode = r["returncode"]
            except (ValueError, KeyError, TypeError, OSError):
                continue  # a record this dashboard cannot read tells nothing the run folder does not
            self.jobs[job.run_id] = job

    def get(self, run_id: str) -> Job | None:
        return self.jobs.get(run_id)

    def start(self, run_id: str, argv: list[str], task: str = "", model: str = "", method: str = "") -> Job:
        """Start `strop ARGV` (a `train` command) for the run `run_id`; refused while one runs for it."""
        with self._lock:
            old = self.jobs.get(run_id)
            if old is not None and old.alive:
                raise StropError(f"{run_id}: a job for this run is still running")
            safe = re.sub(r"[^A-Za-z0-9_.-]", "_", run_id)
            log = self.state / "logs" / f"{safe}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            job = Job(run_id, ["strop", *argv], log, time.time(), task, model, method)
            with open(log, "ab") as out:
                out.write(f"$ {shlex.join(job.command)}\n".encode())
                out.flush()
                job.process = subprocess.Popen(
                    [sys.executable, "-m", "strop", *argv],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,  # Ctrl-C in the dashboard's terminal is not sent to it twice
                    env={**os.environ, signals.PARENT_ENV: str(os.getpid())},
                )
            self.jobs[run_id] = job
            self._save(job)
        threading.Thread(target=self._wait, args=(job,), daemon=True).start()
        return job

    def stop(self, run_id: str) -> None:
        job = self.jobs.get(run_id)
        if job is None or not job.alive or job.process is None:
            raise StropError(f"{run_id}: no job of this dashboard is running it")
        try:
            job.process.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass

    def stop_all(self) -> None:
        for job in list(self.jobs.values()):
            if job.alive and job.process is not None:
                job.process.send_signal(signal.SIGTERM)

    def _wait(self, job: Job) -> None:
        assert job.process is not None
        code = job.process.wait()
        with self._lock:
            job.returncode = code
            self._save(job)

    def _save(self, job: Job) -> None:
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", job.run_id)
        atomic_write_json(self.state / "jobs" / f"{safe}.json", job.record())
