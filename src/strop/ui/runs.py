"""The runs folder as the dashboard shows it: one row per run, one page per run, the tail of a curve.

Everything is read from the files a run leaves (report/collect.py reads them for the report too), so a
run started with `strop train` in a terminal shows up as well as one started from the page. Status:

- running: a job started by this dashboard is alive, or (a run started elsewhere) one of its files
  changed in the last `ACTIVE_SECONDS`;
- finished: result.json is there (training ended and the model was exported), unless a job of ours
  then failed (in the evaluation or the report);
- stopped: a checkpoint is there to resume from (a job of ours that ended by SIGINT/SIGTERM, or a run
  left unfinished);
- failed: a job of ours that exited with an error, or a run with neither a result nor a checkpoint
  that nobody is writing.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from strop.core.errors import StropError
from strop.report.collect import Run, dig, is_number, read_run, training_facts
from strop.report.evaluation import primary_metric
from strop.training.checkpoint import list_checkpoints, read_state
from strop.ui.jobs import Job

ACTIVE_SECONDS = 90.0  # a run of another process counts as running while its files change this often
SKIP = {
    "checkpoints",
    "model",
    "eval",
    "report_files",
    "tensorboard",
    "mlruns",
    "wandb",
    "cache",
}  # inside a run, no runs
MAX_DEPTH = 3  # runs, stages (run/stage) and tune trials (study/trials/007)


def find_runs(root: Path) -> list[Path]:
    """Every folder under `root` holding a config.yaml (a run, a stage, a tune study or trial)."""
    found: list[Path] = []

    def walk(folder: Path, depth: int) -> None:
        try:
            children = sorted(p for p in folder.iterdir() if p.is_dir())
        except OSError:
            return
        for child in children:
            if child.name.startswith(".") or child.name in SKIP:
                continue
            if (child / "config.yaml").is_file():
                found.append(child)
            if depth < MAX_DEPTH:
                walk(child, depth + 1)

    walk(root, 1)
    return found


def run_id(root: Path, run_dir: Path) -> str:
    return run_dir.relative_to(root).as_posix()


def resolve(root: Path, rid: str) -> Path:
    """The run folder of a run id from a URL: a folder strictly inside `root` holding a config.yaml (what
    `find_runs` lists); never `root` itself (an empty id) or a folder outside it."""
    if not rid.strip("/"):
        raise StropError(f"no run id given: expected a run folder under {root}")
    path = (root / rid).resolve()
    inside = path.is_relative_to(root.resolve()) and path != root.resolve()
    if ".." in Path(rid).parts or not inside or not (path / "config.yaml").is_file():
        raise StropError(f"no run {rid!r} under {root}")
    return path


def status(run_dir: Path, job: Job | None) -> str:
    if job is not None and job.alive:
        return "running"
    if job is not None and job.returncode not in (0, None) and not job.stopped:
        return "failed"  # also after result.json: its evaluation or report failed (the error says)
    if (run_dir / "result.json").is_file():
        return "finished"
    if job is None and time.time() - _last_change(run_dir) < ACTIVE_SECONDS:
        return "running"
    return "stopped" if _checkpoints(run_dir) else "failed"


def row(root: Path, run_dir: Path, job: Job | None) -> dict:
    """One line of the runs table."""
    run = read_run(run_dir)
    facts = training_facts(run)
    metric, value = headline_metric(run)
    return {
        "id": run_id(root, run_dir),
        "name": run.name,
        "task": str(dig(run.config, "task") or "sft"),
        "model": str(dig(run.config, "model", "name") or ""),
        "method": str(dig(run.config, "method", "name") or ""),
        "status": status(run_dir, job),
        "best_val_loss": facts["best_val_loss"] if is_number(facts["best_val_loss"]) else None,
        "metric": metric,
        "metric_value": value,
        "seconds": facts["seconds"] if is_number(facts["seconds"]) else None,
        "steps": facts["steps"],
        "started": (run_dir / "config.yaml").stat().st_mtime,
    }


def starting_row(job: Job) -> dict:
    """A job of ours whose run folder does not exist yet (the model and data are still loading)."""
    return {
        "id": job.run_id,
        "name": Path(job.run_id).name,
        "task": job.task,
        "model": job.model,
        "method": job.method,
        "status": "running" if job.alive else "failed",
        "best_val_loss": None,
        "metric": None,
        "metric_value": None,
        "seconds": None,
        "steps": None,
        "started": job.started,
    }


def headline_metric(run: Run) -> tuple[str | None, float | None]:
    """The evaluation's primary metric on the tuned model (the report's headline metric)."""
    name = primary_metric(run.eval, run.samples)
    value = dig(run.eval, "metrics", name) if name else None
    if isinstance(value, dict):
        value = value.get("tuned")
    return (name, value) if is_number(value) else (name, None)


def page(root: Path, run_dir: Path, job: Job | None) -> dict:
    """What a run page shows, besides the curves (those come from `tail`)."""
    run = read_run(run_dir)
    checkpoints = []
    for c in reversed(_checkpoints(run_dir)):
        state = read_state(c) or {}
        checkpoints.append(
            {
                "path": str(c),
                "step": state.get("step"),
                "val_loss": state.get("best_val_loss"),
                "finished": bool(state.get("finished")),
            }
        )
    return {
        "row": row(root, run_dir, job),
        "dir": str(run_dir),
        "config": _text(run_dir / "config.yaml"),
        "data": run.data,
        "samples": run.samples,
        "checkpoints": checkpoints,
        "report": (run_dir / "report.html").is_file(),
        "model": (run_dir / "model" / "strop_model.json").is_file(),
        "notes": run.notes,
    }


def tail(run_dir: Path, offset: int) -> dict:
    """metrics.jsonl from byte `offset` to its last complete line: {records, offset, reset}. `reset` is
    true when the file is shorter than `offset` (a resumed run rewrites it): the records are all of it."""
    path = run_dir / "metrics.jsonl"
    try:
        data = path.read_bytes()
    except OSError:
        return {"records": [], "offset": 0, "reset": offset > 0}
    reset = offset > len(data)
    start = 0 if reset else offset
    end = data.rfind(b"\n", start) + 1  # a line still being written waits for the next poll
    records = []
    for line in data[start:end].splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # torn by a kill: the report skips it too
        if isinstance(record, dict):
            records.append(record)
    return {"records": records, "offset": max(end, start), "reset": reset}


def _checkpoints(run_dir: Path) -> list[Path]:
    return list_checkpoints(run_dir)


def _last_change(run_dir: Path) -> float:
    times = [p.stat().st_mtime for p in (run_dir, run_dir / "metrics.jsonl") if p.exists()]
    ckpt = run_dir / "checkpoints"
    if ckpt.is_dir():
        times.append(ckpt.stat().st_mtime)
    return max(times, default=0.0)


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
