"""Where metrics go: `metrics.jsonl` in the run directory, and the run's trackers (core/tracking.py:
TensorBoard, MLflow, W&B).

The file is append-only, so a process killed mid-write can leave a torn last line. Readers skip lines
that do not parse; a resumed run drops them (with a warning that counts them) and rewrites the file
atomically before appending again.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from strop.core import tracking
from strop.core.io import append_jsonl, atomic_write_text

log = logging.getLogger("strop")


class MetricsSink:
    def __init__(self, run_dir: Path, resume_step: int = 0):
        self.path = run_dir / "metrics.jsonl"
        self.kept: list[dict] = []  # records of the steps before `resume_step`, in file order
        if resume_step and self.path.exists():
            # drop records written after the checkpoint we resume from, so the file matches one run
            records, torn = parse_jsonl(self.path)
            if torn:
                log.warning(
                    "%s: dropped %d unreadable line(s) (%s), a write cut off when the run was killed",
                    self.path,
                    len(torn),
                    ", ".join(f"line {n}" for n in torn[:5]),
                )
            self.kept = [r for r in records if r.get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.kept))
        elif self.path.exists():
            self.path.unlink()

    def log(self, record: dict) -> None:
        append_jsonl(self.path, record)
        tracking.log_record(record)

    def close(self) -> None:
        pass  # the trackers outlive the loop: the evaluation and the report reach them too


def parse_jsonl(path: Path) -> tuple[list[dict], list[int]]:
    """The JSON objects of an append-only log, and the numbers of the lines that are not one."""
    records, bad = [], []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            bad.append(n)
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            bad.append(n)
    return records, bad


def read_metrics(run_dir: Path) -> list[dict]:
    """A run's metric records; a line torn by a crash (or still being written) is skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return parse_jsonl(path)[0]
