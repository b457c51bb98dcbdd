"""Checkpoints without pickle: trainable weights, optimizer state and RNG states in safetensors,
everything else in JSON. Each checkpoint folder appears atomically; older ones are pruned only after
the new one is complete, keeping the last K and the best.

    run_dir/checkpoints/step-000040/
        trainable.safetensors   # parameters with requires_grad (LoRA weights, unfrozen blocks, or all)
        optimizer.safetensors   # per-parameter state tensors, keyed "<index>.<name>"
        optimizer.json          # param_groups (hyperparameters)
        rng.safetensors         # torch CPU (and CUDA) generator states
        state.json              # step, best validation, counters, Python RNG state

A run whose blocks are sharded over N processes (`train.parallel: fsdp`, training/sharding.py) writes
the tensors with torch.distributed.checkpoint instead, every process its own rows, still safetensors:

    run_dir/checkpoints/step-000040/
        model/shard-0000R-model-00001-of-00001.safetensors      # trainable weights, rows of process R
        optimizer/shard-0000R-model-00001-of-00001.safetensors  # optimizer state, "<index>.<name>"
        optimizer.json, rng.safetensors, state.json            # as above, written last by rank 0

Each file records where its rows sit in the whole tensor (DCP's sharding info), so any number of
processes, sharded or not, loads either layout, and a plain checkpoint loads into a sharded run.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from strop.core import distributed
from strop.core.errors import StropError
from strop.core.io import atomic_dir
from strop.training import sharding

PREFIX = "step-"
log = logging.getLogger("strop.train")


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"{PREFIX}{step:06d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / "state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name[len(PREFIX) :]))


def remove_partial_checkpoints(run_dir: Path) -> None:
    """Remove temporary folders a hard-killed save left behind (complete checkpoints are never touched)."""
    root = run_dir / "checkpoints"
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name):
                shutil.rmtree(p, ignore_errors=True)


def save_checkpoint(
    run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, keep_last: int
) -> Path:
    trainable = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    opt_tensors, opt_meta = _flatten_optimizer(optimizer)
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    full_state = {**state, "python_rng": random.getstate()}  # JSON writes its tuples as lists

    def fill(tmp: Path) -> None:
        save_file(trainable, str(tmp / "trainable.safetensors"))
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        save_file(rng, str(tmp / "rng.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps(opt_meta))
        (tmp / "state.json").write_text(json.dumps(full_state, indent=2))

    path = atomic_dir(checkpoint_dir(run_dir, state["step"]), fill)
    _prune(run_dir, keep_last, state.get("best_step"))
    return path


def save_sharded_checkpoint(
    run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, keep_last: int
) -> Path:
    """Every process writes its rows of the weights and optimizer state into a folder rank 0 prepared;
    rank 0 then adds the JSON and RNG files, state.json last, and renames the folder into place
    (core/io.atomic_dir), so a checkpoint is complete or absent, as a plain one."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    final = checkpoint_dir(run_dir, state["step"])
    shared = final.with_name(f".{final.name}.tmp-shards")
    if distributed.WORLD.main:
        shutil.rmtree(shared, ignore_errors=True)
        shared.mkdir(parents=True)
    distributed.barrier()
    trainable = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    opt_tensors, opt_meta = _flatten_optimizer(optimizer)
    for part, tensors in (("model", trainable), ("optimizer", opt_tensors)):
        dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(shared / part), save_distributed=True))
    distributed.barrier()
    if distributed.WORLD.main:
        full_state = {**state, "python_rng": random.getstate(), "sharded": distributed.WORLD.size}

        def fill(tmp: Path) -> None:
            for part in ("model", "optimizer"):
                os.replace(shared / part, tmp / part)
            save_file({"torch_cpu": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
            (tmp / "optimizer.json").write_text(json.dumps(opt_meta))
            (tmp / "state.json").write_text(json.dumps(full_state, indent=2))

        atomic_dir(final, fill)
        shutil.rmtree(shared, ignore_errors=True)
        _prune(run_dir, keep_last, state.get("best_step"))
    distributed.barrier()
    return final


def read_state(path: Path) -> dict | None:
    """A checkpoint's state.json, or None when it is damaged (a file edited or cut short on disk)."""
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and isinstance(state.get("step"), int) else None


def resume_latest(
    run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict, Path] | None:
    """Load the newest checkpoint that loads whole; a damaged one is skipped with a warning naming it
    (complete checkpoints only become damaged on disk, never by strop). None when there is none."""
    ckpts = list_checkpoints(run_dir)
    for path in reversed(ckpts):
        try:
            return load_checkpoint(path, model, optimizer), path
        except StropError:
            raise  # a checkpoint of another model or method: loading an older one would not help
        except Exception as e:  # noqa: BLE001 - any unreadable file makes the checkpoint unusable
            log.warning("%s is damaged (%s: %s); trying the checkpoint before it", path, type(e).__name__, e)
    if ckpts:
        raise StropError(
            f"{run_dir / 'checkpoints'}: no checkpoint loads (all {len(ckpts)} damaged; see the warnings); "
            "start the run again under a new name with --set name=NEW_NAME"
        )
    return None


def rng_snapshot() -> tuple:
    """Every generator a step draws from (torch CPU and CUDA, Python's), to undo an abandoned step's draws."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return torch.get_rng_state(), cuda, random.getstate()


def restore_rng(snapshot: tuple) -> None:
    cpu, cuda, python = snapshot
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
    random.setstate(python)


def load_weights(path: Path, model: nn.Module) -> None:
    params = dict(model.named_parameters())
    weights = _read_tensors(path, "model", "trainable", params.get)
    missing = [n for n in weights if n not in params]
    if missing:
        raise StropError(
            f"{path} was saved by a run with a different model or method (it has weights such as "
            f"{missing[0]!r} that this model lacks); start a new run with --set name=NEW_NAME"
        )
    with torch.no_grad():
        for n, t in weights.items():
            params[n].copy_(t)


def _read_tensors(
    path: Path, part: str, plain: str, target: Callable[[str], torch.Tensor | None]
) -> dict[str, torch.Tensor]:
    """The tensors of one part of a checkpoint (`part`: the sharded folder, `plain`: the plain file),
    each laid out as `target(name)` (the parameter it belongs to: sharded or whole) when it has that
    parameter's shape, else whole; names with no parameter come back as saved, for the caller to refuse."""
    if (path / f"{plain}.safetensors").is_file():
        saved = load_file(str(path / f"{plain}.safetensors"))
        return {k: sharding.like(target(k), v) for k, v in saved.items()}
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    reader = HuggingFaceStorageReader(str(path / part))
    saved_meta = reader.read_metadata().state_dict_metadata
    out: dict[str, torch.Tensor] = {}
    for k, meta in saved_meta.items():
        size, dtype = meta.size, meta.properties.dtype  # type: ignore[union-attr]
        t = target(k)
        if t is not None and tuple(t.shape) == tuple(size):
            out[k] = torch.zeros_like(t, dtype=dtype)  # sharded like its target, or whole
        else:
            out[k] = torch.zeros(size, dtype=dtype)
    import torch.distributed as dist

    single = not dist.is_initialized()  # one process reading a sharded checkpoint whole
    dcp.load(out, storage_reader=HuggingFaceStorageReader(str(path / part)), no_dist=single)
    return out


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore weights, optimizer and RNG states; returns the saved loop state."""
    load_weights(path, model)
    meta = json.loads((path / "optimizer.json").read_text())
    tensors = _read_tensors(path, "optimizer", "optimizer", _optimizer_param(optimizer, meta))
    try:
        optimizer.load_state_dict(_unflatten_optimizer(tensors, meta))
    except ValueError as e:
        raise StropError(
            f"{path}: the optimizer state does not fit this run's trainable parameters ({e}); the method or "
            "its settings changed since the checkpoint, start a new run with --set name=NEW_NAME"
        ) from None
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["torch_cpu"])
    cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda_"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    state = json.loads((path / "state.json").read_text())
    random.setstate(_tupled(state.pop("python_rng")))
    return state


def _optimizer_param(optimizer: torch.optim.Optimizer, meta: dict) -> Callable[[str], torch.Tensor | None]:
    """The parameter a saved optimizer tensor "<index>.<name>" belongs to, for its layout (a state tensor
    shaped like its parameter is sharded like it; `step` and other scalars stay whole)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    order = [i for group in meta["param_groups"] for i in group["params"]]
    by_index = dict(zip(order, params, strict=False))
    return lambda key: by_index.get(int(key.split(".", 1)[0]))


def _flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{idx}.{k}"] = v.detach().contiguous()
            elif v is not None:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict, meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def _prune(run_dir: Path, keep_last: int, best_step: int | None) -> None:
    ckpts = list_checkpoints(run_dir)
    keep = set(ckpts[-keep_last:])
    keep |= {p for p in ckpts if best_step is not None and p.name == f"{PREFIX}{best_step:06d}"}
    for p in ckpts:
        if p not in keep:
            shutil.rmtree(p, ignore_errors=True)


def _tupled(x):
    return tuple(_tupled(v) for v in x) if isinstance(x, list) else x
