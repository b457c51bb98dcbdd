"""Experiment tracking beside metrics.jsonl: TensorBoard, MLflow and Weights & Biases (`train.report_to`).

Nothing leaves the machine unless the user says so: MLflow writes to the tracking URI in
$MLFLOW_TRACKING_URI, else a file store in the run folder (`mlruns/`); W&B runs in offline mode
(files in the run folder's `wandb/`) unless $WANDB_MODE says otherwise. Each tracker gets the run's
config as parameters, every logged step's numbers, and at the end the evaluation's numbers and the
report, result and evaluation files as artifacts. The tracking runs' ids are kept in the run folder
(`tracking.json`), so a resumed run goes on in the same MLflow run and W&B run.

One run is tracked at a time per process (`start` ... `finish`); `log` is what MetricsSink calls for
every record. Only the main process of a distributed run tracks. Without `report_to`, TensorBoard is
written when it is installed (as before); a tracker named in `report_to` whose package is missing is
refused by name before training starts (`check`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from strop.core.errors import ConfigError
from strop.core.io import atomic_write_json

log = logging.getLogger("strop")
PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}
INSTALL = {"tensorboard": "tensorboard", "mlflow": "mlflow-skinny", "wandb": "wandb"}
ARTIFACTS = ("report.html", "report.md", "report.json", "result.json", "eval/summary.json", "config.yaml")
_active: Tracking | None = None


def check(report_to: Sequence[str] | None) -> None:
    """Every tracker asked for can be imported (before training starts)."""
    import importlib.util

    for name in report_to or []:
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise ConfigError(
                f"train.report_to: {name} needs the {INSTALL[name]} package: pip install {INSTALL[name]} "
                "(or pip install 'strop[tracking]')"
            )


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists are kept whole (as their JSON)."""
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def numbers(d: dict) -> dict[str, float]:
    return {
        k: float(v) for k, v in flatten(d).items() if isinstance(v, int | float) and not isinstance(v, bool)
    }


class Tracking:
    def __init__(self, names: list[str], run_dir: Path, name: str, config: dict):
        self.run_dir = run_dir
        ids_path = run_dir / "tracking.json"
        ids = json.loads(ids_path.read_text()) if ids_path.is_file() else {}
        self.backends: list[Any] = []
        makers = {"tensorboard": _TensorBoard, "mlflow": _MLflow, "wandb": _Wandb}
        for n in names:
            self.backends.append(makers[n](run_dir, name, config, ids.get(n)))
        kept = {n: b.id for n, b in zip(names, self.backends, strict=True) if b.id is not None}
        if kept != ids and kept:
            atomic_write_json(ids_path, kept)
        for n, b in zip(names, self.backends, strict=True):
            if b.where:
                log.info("tracking: %s%s at %s", n, " (resumed)" if ids.get(n) else "", b.where)

    def log(self, record: dict) -> None:
        step = int(record.get("step", 0))
        values = {k: v for k, v in numbers(record).items() if k != "step"}
        for b in self.backends:
            b.log(values, step)

    def finish(self, evaluation: dict | None, status: str = "FINISHED") -> None:
        files = [self.run_dir / a for a in ARTIFACTS if (self.run_dir / a).is_file()]
        for b in self.backends:
            try:
                b.finish(numbers({"eval": evaluation}) if evaluation else {}, files, status)
            except Exception as e:  # a tracker that fails at the end never loses the trained run
                log.warning("tracking: %s could not finish: %s", type(b).__name__.strip("_"), e)


def start(report_to: Sequence[str] | None, run_dir: Path, name: str, config: dict) -> Tracking | None:
    """The run's trackers (None when there are none); MetricsSink forwards its records to them."""
    global _active
    names = (
        list(report_to) if report_to is not None else (["tensorboard"] if _installed("tensorboard") else [])
    )
    _active = Tracking(names, run_dir, name, config) if names else None
    return _active


def finish(evaluation: dict | None, status: str = "FINISHED") -> None:
    global _active
    if _active is not None:
        tracking, _active = _active, None
        tracking.finish(evaluation, status)


def log_record(record: dict) -> None:
    if _active is not None:
        _active.log(record)


def _installed(package: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(package) is not None


class _TensorBoard:
    def __init__(self, run_dir: Path, name: str, config: dict, run_id: str | None):
        from torch.utils.tensorboard import SummaryWriter

        self.id, self.where = None, None
        self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def finish(self, evaluation: dict[str, float], files: list[Path], status: str) -> None:
        for k, v in evaluation.items():
            self.writer.add_scalar(k, v, 0)
        self.writer.close()


class _MLflow:
    def __init__(self, run_dir: Path, name: str, config: dict, run_id: str | None):
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # the default: a file store in the run folder, nothing sent anywhere
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for the opt-in
            uri = (run_dir / "mlruns").resolve().as_uri()
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        self.where, self.run_dir = uri, run_dir
        if run_id is None:
            experiment = self.client.get_experiment_by_name(name)
            eid = experiment.experiment_id if experiment else self.client.create_experiment(name)
            run_id = self.client.create_run(eid, run_name=name).info.run_id
            params = [
                Param(k, json.dumps(v) if not isinstance(v, str) else v) for k, v in flatten(config).items()
            ]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(run_id, params=params[i : i + 100])
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.id = run_id

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(_mlflow_key(k), v, now, step) for k, v in values.items()]
        if metrics:
            self.client.log_batch(self.id, metrics=metrics)

    def finish(self, evaluation: dict[str, float], files: list[Path], status: str) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        if evaluation:
            self.client.log_batch(
                self.id, metrics=[Metric(_mlflow_key(k), v, now, 0) for k, v in evaluation.items()]
            )
        for f in files:
            folder = f.parent.relative_to(self.run_dir).as_posix()
            self.client.log_artifact(self.id, str(f), None if folder == "." else folder)
        self.client.set_terminated(self.id, status)


def _mlflow_key(key: str) -> str:
    """MLflow keys allow letters, digits, _ - . / and spaces."""
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in key)


class _Wandb:
    def __init__(self, run_dir: Path, name: str, config: dict, run_id: str | None):
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        mode = os.environ.get("WANDB_MODE") or "offline"  # online only when the user set it
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or "strop",
            name=name,
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            mode=mode,  # type: ignore[arg-type]
            config=config,
            settings=wandb.Settings(console="off", save_code=False),
        )
        self.id, self.run_dir = self.run.id, run_dir
        self.where = f"{run_dir / 'wandb'} ({mode})"

    def log(self, values: dict[str, float], step: int) -> None:
        if values:
            self.run.log(values, step=step)

    def finish(self, evaluation: dict[str, float], files: list[Path], status: str) -> None:
        if evaluation:
            self.run.summary.update(evaluation)
        for f in files:  # kept under their paths in the run folder (eval/summary.json)
            self.run.save(str(f), base_path=str(self.run_dir), policy="now")
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)
