"""The run folder's life: checked before any work, created only once the model and data have loaded,
and left either resumable or absent, whatever ends the run.

- `check_output_dir`: `output_dir` is a folder strop can write in, with room for the model's weights,
  before anything is loaded or tokenized.
- `open_run_folder`: after the model is built (its trainable set known): room for one checkpoint and the
  export, then the folder, `config.yaml` and `data_summary.json`.
- `guarded`: every way a run can end early (a signal, a full disk, a read-only or vanished folder, any
  error) ends in one message that says what is intact and how to continue; a run folder this call
  created that holds nothing resumable is removed.
"""

from __future__ import annotations

import logging
import shutil
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from strop.core import distributed, signals
from strop.core.config import RunConfig, to_yaml
from strop.core.errors import ConfigError, Interrupted, StropError, describe_os_error, user_os_error
from strop.core.io import atomic_write_json, atomic_write_text, check_output
from strop.training.checkpoint import list_checkpoints, read_state

log = logging.getLogger("strop")

MARGIN = 16 * 2**20  # bytes: config, metrics, tokenizer files and the file system's own overhead
# files that alone make a run folder not worth keeping: nothing in them can be resumed or reused
BOOKKEEPING = {
    "config.yaml",
    "data_summary.json",
    "metrics.jsonl",
    "tensorboard",
    "mlruns",
    "wandb",
    "tracking.json",
    "stages.json",
    "checkpoints",
}

_created: list[Path] = []  # run folders made by the run now in progress, for clean-up if it fails


def check_output_dir(cfg: RunConfig) -> None:
    """`output_dir` (or what of it exists yet) is a folder strop can write in, with room for the weights
    of a full fine-tune's checkpoint when the method trains every weight."""
    if cfg.run_dir.exists() and not cfg.run_dir.is_dir():
        raise ConfigError(f"name: {cfg.run_dir} is a file, not a folder; choose another with --set name=...")
    existing = check_output(cfg.run_dir, "output_dir", folder=True)
    need = MARGIN + (_weight_file_bytes(cfg.model.name) if cfg.method.name == "full" else 0)
    _check_room(existing, need, "a run" if need == MARGIN else "the model's weights")


def open_run_folder(cfg: RunConfig, data_summary: dict, model: torch.nn.Module) -> Path:
    """Check there is room for a checkpoint and the export of `model`, then create the run folder (if new)
    with its config and data summary."""
    run_dir = cfg.run_dir
    existing = next(p for p in (run_dir, *run_dir.parents) if p.exists())
    _check_room(existing, MARGIN + checkpoint_bytes(model, cfg), "a checkpoint with the exported model")
    if not run_dir.exists():
        created = [p for p in (run_dir, *run_dir.parents) if not p.exists()]
        run_dir.mkdir(parents=True)
        _created.extend(reversed(created))
    atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
    atomic_write_json(run_dir / "data_summary.json", data_summary)
    return run_dir


def note_created(path: Path) -> None:
    """A folder made by this run outside `open_run_folder` (the stages' parent folder)."""
    _created.append(path)


def checkpoint_bytes(model: torch.nn.Module, cfg: RunConfig) -> int:
    """Bytes of one checkpoint (trainable weights and the optimizer's per-weight state) plus the export
    (the adapter for LoRA, every weight otherwise)."""
    seen, trainable, every = set(), 0, 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            size = p.numel() * p.element_size()
            every += size
            trainable += size if p.requires_grad else 0
    o = cfg.optim
    moments = 2 if o.name in ("adam", "adamw") else (1 if o.momentum else 0)
    return trainable * (1 + moments) + (trainable if cfg.method.name == "lora" else every)


def _check_room(folder: Path, need: int, what: str) -> None:
    free = shutil.disk_usage(folder).free
    if free < need:
        raise StropError(
            f"output_dir: {folder} has {_size(free)} free, and {what} needs at least {_size(need)}; free some "
            "space or choose another folder with --set output_dir=DIR"
        )


def _weight_file_bytes(name: str) -> int:
    """Bytes of the safetensors weights of a local model folder (0 for other sources: unknown yet)."""
    p = Path(name).expanduser()
    if (p / "model").is_dir():  # a strop run
        p = p / "model"
    return sum(f.stat().st_size for f in p.glob("*.safetensors")) if p.is_dir() else 0


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GB" if n >= 2**30 else f"{n / 2**20:.0f} MB"


@contextmanager
def guarded(cfg: RunConfig, command: str) -> Iterator[None]:
    """Run a training job under signal handling; turn file-system failures and signals into one message
    naming what is intact, and remove run folders it created that hold nothing resumable.
    `command` is how the user started the run (named in "start again with ...")."""
    _created.clear()
    try:
        with signals.graceful_stop():
            yield
    except BaseException as e:
        kept = _remove_unfinished() if distributed.WORLD.main else []
        if isinstance(e, (Interrupted, KeyboardInterrupt)):
            signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
            raise Interrupted(signum, _where_to_continue(cfg.run_dir, command, kept)) from None
        os_error = None if isinstance(e, StropError) else user_os_error(e)
        if os_error is None:
            raise
        raise StropError(
            f"{describe_os_error(os_error)}. {_where_to_continue(cfg.run_dir, command, kept)}"
        ) from None
    finally:
        _created.clear()


def _where_to_continue(run_dir: Path, command: str, kept: list[str]) -> str:
    """What a stopped run kept, and the command that continues it."""
    found = [c for d in (run_dir, *sorted(run_dir.glob("*/"))) for c in list_checkpoints(d)[-1:]]
    if not found:
        if kept:
            return (
                f"Nothing was trained yet; {', '.join(kept)} in {run_dir} is kept, and "
                f"`strop train --resume {run_dir}` starts training without computing it again"
            )
        return f"Nothing was trained yet, so there is nothing to resume; start again with {command}"
    latest = max(found, key=lambda p: p.stat().st_mtime)
    run = latest.parent.parent
    state = read_state(latest) or {}
    if state.get("finished") and (run / "result.json").is_file():
        return (
            f"Training had finished: the model is in {run / 'model'} and its figures in "
            f"{run / 'result.json'}; what came after (evaluation, the report) was cut short: "
            f"`strop report {run}` writes the report"
        )
    return (
        f"The checkpoint of step {state.get('step', '?')} is intact ({latest}); continue with "
        f"`strop train --resume {run_dir}`"
    )


def reusable_work(run_dir: Path) -> list[str]:
    """Files in a run folder without checkpoints that a new start would reuse (DPO's reference log-probs)."""
    if not run_dir.is_dir():
        return []
    return sorted(
        p.name for p in run_dir.iterdir() if p.name not in BOOKKEEPING and not p.name.startswith(".")
    )


def _remove_unfinished() -> list[str]:
    """Remove run folders this run created that hold no checkpoint and nothing else worth keeping;
    returns the names of what was kept in them."""
    kept: list[str] = []
    for folder in reversed(_created):
        if not folder.is_dir():
            continue
        if _bookkeeping_only(folder):
            shutil.rmtree(folder, ignore_errors=True)
            log.info("removed %s: the run stopped before it saved anything", folder)
        elif not list_checkpoints(folder):
            kept += reusable_work(folder)
    return kept


def _bookkeeping_only(folder: Path) -> bool:
    if list_checkpoints(folder):
        return False
    for p in folder.iterdir():
        if p.name in BOOKKEEPING or p.name.startswith("."):
            continue
        if not (p.is_dir() and _bookkeeping_only(p)):
            return False
    return True
