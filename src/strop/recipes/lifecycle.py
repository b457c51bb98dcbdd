"""What every run shares, whatever its task: the start (config, refusing to redo a finished run,
threads, device, dtype, memory), the parameter log, the result file and the report. The recipes (sft,
classify, preference, rl) compose these around their own data, objective and evaluation."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import yaml

from strop.core import distributed
from strop.core.config import RunConfig, load_config
from strop.core.device import keep_freed_memory, resolve_device, resolve_dtype, set_threads, usable_cores
from strop.core.errors import StropError
from strop.core.io import atomic_write_json
from strop.models.trainable import count_parameters
from strop.training.checkpoint import list_checkpoints, read_state

log = logging.getLogger("strop")


@dataclass
class TrainResult:
    run_dir: Path
    model_dir: Path
    metrics: dict
    data: dict = field(default_factory=dict)
    seconds: float = 0.0
    eval: dict | None = None
    report: Path | None = None


class RunSetup(NamedTuple):
    """What every recipe resolves first: the validated config (output_dir made absolute), threads, device
    and dtype."""

    cfg: RunConfig
    threads: int
    device: torch.device
    dtype: torch.dtype


def start_run(config: RunConfig | dict | str | Path, overrides: list[str] | None = None) -> RunSetup:
    cfg = config if isinstance(config, RunConfig) else load_config(config, overrides)
    cfg = cfg.model_copy(update={"output_dir": str(Path(cfg.output_dir).expanduser().resolve())})
    check_rerun(cfg)
    world = distributed.WORLD
    # processes of one machine share its cores (torchrun's OMP_NUM_THREADS=1 is overruled)
    threads = set_threads(cfg.train.threads or max(1, usable_cores() // world.local_size))
    device = distributed.local_device(resolve_device(cfg.model.device))
    distributed.init(device)
    configure_memory(cfg, device)
    return RunSetup(cfg, threads, device, resolve_dtype(cfg.model.dtype, device))


def configure_memory(cfg: RunConfig, device: torch.device) -> None:
    """On CPU, keep freed memory in the process for reuse (no page faults to re-touch each step's
    activations, reference passes and feature caches included) unless train.release_memory asks for a
    trim after every micro-batch instead."""
    if device.type == "cpu" and not cfg.train.release_memory:
        keep_freed_memory()


def log_parameters(
    model, cfg: RunConfig, device: torch.device, dtype: torch.dtype, threads: int
) -> tuple[int, int]:
    """Log how many parameters train; returns (trainable, total)."""
    trainable, total = count_parameters(model)
    log.info(
        "%s: method %s, %s of %s parameters train (%.2f%%); %s %s, %d threads",
        cfg.task,
        cfg.method.name,
        f"{trainable:,}",
        f"{total:,}",
        100 * trainable / total,
        device,
        str(dtype).replace("torch.", ""),
        threads,
    )
    return trainable, total


def save_result(
    run_dir: Path, result, trainable: int, total: int, model_dir: Path, t0: float, data_summary: dict
) -> tuple[dict, float]:
    """result.json of a finished run (any recipe): the loop's final metrics, parameter counts, where the
    model is, the wall time since `t0` and the data summary. Returns (metrics, seconds)."""
    metrics = {
        **result.final,
        "steps": result.steps,
        "best_step": result.best_step,
        "best_val_loss": result.best_val_loss,
        "skipped_steps": result.skipped_steps,
        "stopped_early": result.stopped_early,
        "trainable_parameters": trainable,
        "total_parameters": total,
    }
    seconds = time.time() - t0
    atomic_write_json(
        run_dir / "result.json",
        {"metrics": metrics, "model_dir": str(model_dir), "seconds": seconds, "data": data_summary},
    )
    return metrics, seconds


def write_run_report(run_dir: Path) -> Path | None:
    """report.html/.md/.json; a failure here is logged, never allowed to cost the finished run. The
    report (and matplotlib, ~0.6 s to import) loads here, at the end: a run stopped, killed or failed
    earlier, and every process of a distributed run but the first, never pays for it."""
    from strop.report import write_report

    try:
        return write_report(run_dir)["html"]
    except Exception as e:  # noqa: BLE001 - the model and metrics are already saved
        log.warning(
            "could not write the run report (%s: %s); retry with `strop report %s`",
            type(e).__name__,
            e,
            run_dir,
        )
        return None


def check_rerun(cfg: RunConfig) -> None:
    """Before any work on a run directory that holds checkpoints: refuse a finished run, and say which
    config keys differ from the saved config of the run being resumed."""
    ckpts = list_checkpoints(cfg.run_dir)
    if ckpts:
        _refuse_finished(cfg.run_dir, read_state(ckpts[-1]) or {}, cfg)
        _warn_config_changes(cfg.run_dir / "config.yaml", cfg)


def _refuse_finished(run_dir: Path, state: dict, cfg: RunConfig) -> None:
    """A finished, exported run is not trained again, unless the config asks for more steps."""
    # finished means trained, exported and its result written: a run stopped before its result (during
    # export, say) is completed by running it again
    done = (run_dir / "model" / "strop_model.json").is_file() and (run_dir / "result.json").is_file()
    more_steps = cfg.train.max_steps is not None and cfg.train.max_steps > state.get("step", 0)
    if state.get("finished") and done and not more_steps:
        raise StropError(
            f"{run_dir} already holds a finished run (step {state['step']}); choose another name "
            f"(--set name=...), or train it further with --set train.max_steps=N (N > {state['step']})"
        )


def _warn_config_changes(saved: Path, cfg: RunConfig) -> None:
    """Resuming with a changed config is allowed (e.g. more steps) but never silent."""
    if not saved.is_file():
        return
    old, new = _flatten(yaml.safe_load(saved.read_text())), _flatten(cfg.model_dump(mode="json"))
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    if changed:
        log.warning(
            "resuming %s with a changed config: %s",
            saved.parent,
            ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed),
        )


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
