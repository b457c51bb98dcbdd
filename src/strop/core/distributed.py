"""The processes of one run under torch.distributed (torchrun), and what they agree on.

`strop train --nproc N` (or `torchrun --nproc-per-node N -m strop train`) starts N copies of the run;
torchrun gives each its RANK, WORLD_SIZE and LOCAL_RANK. Every process holds the whole model (the
weights stay equal: the same start, the same summed gradients), trains on its share of each step's
examples (data/batches.py), and rank 0 alone writes the run folder, logs and reports. One process is
the world of size 1: every function here is then a no-op, and nothing imports torch.distributed.

The exactness rule (training/loop.py): a step's loss is the sum over all processes' units divided by
the count of all of them, so N processes give the step one process gives at the same global batch.
"""

from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from strop.core.errors import StropError

if TYPE_CHECKING:  # torch is imported when a function needs it: `strop --help` stays quick
    import torch


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


def from_env() -> World:
    """The world torchrun describes in the environment (size 1 outside torchrun)."""
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        local_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(size)))
    except ValueError as e:
        raise StropError(f"WORLD_SIZE/RANK/LOCAL_RANK: not a number ({e}); start with torchrun") from None
    return World(rank, size, local, local_size)


WORLD = from_env()
SINGLE = World()  # one process


def init(device: torch.device) -> World:
    """Join the process group (gloo on CPU, NCCL on CUDA) once; the device a process uses on CUDA is
    its local rank's GPU."""
    import torch
    import torch.distributed as dist

    if WORLD.active and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(WORLD.local_rank)
        timeout = datetime.timedelta(seconds=float(os.environ.get("STROP_DIST_TIMEOUT", "1800")))
        dist.init_process_group(backend, timeout=timeout)
    return WORLD


def local_device(device: torch.device) -> torch.device:
    import torch

    if WORLD.active and device.type == "cuda":
        return torch.device("cuda", WORLD.local_rank)
    return device


def _group_ready() -> bool:
    if not WORLD.active:
        return False
    import torch.distributed as dist

    return dist.is_initialized()


def barrier() -> None:
    if _group_ready():
        import torch.distributed as dist

        dist.barrier()


def sum_floats(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sums over all processes, in float64 (counts and loss sums)."""
    import torch

    if not _group_ready():
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=_comm_device(device))
    dist.all_reduce(t)
    return t.tolist()


def any_true(flag: bool, device: torch.device) -> bool:
    """True on every process when it is true on any (a stop signal one process saw)."""
    if not _group_ready():
        return flag
    return sum_floats([1.0 if flag else 0.0], device)[0] > 0


def sum_gradients(params: list[torch.nn.Parameter], device: torch.device) -> None:
    """Sum every parameter's gradient over the processes, in one flat buffer per dtype; a parameter with
    no gradient on this process (its share of the step was empty) takes part as zeros."""
    import torch

    if not _group_ready():
        return
    import torch.distributed as dist

    by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        by_dtype.setdefault(p.grad.dtype, []).append(p)
    for group in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1) for p in group])  # type: ignore[union-attr]
        flat = flat.to(_comm_device(device))
        dist.all_reduce(flat)
        offset = 0
        for p in group:
            grad, n = p.grad, p.numel()
            assert grad is not None  # given zeros above
            grad.copy_(flat[offset : offset + n].view_as(grad))
            offset += n


def _comm_device(device: torch.device) -> torch.device:
    import torch

    return device if device.type == "cuda" else torch.device("cpu")


PEER_LOST = 3  # exit status of a process whose collective broke because another one failed
ERRORS_ENV = "STROP_ERRORS"  # set by `--nproc` (cli/launch.py): the folder its processes leave errors in


def say_error(message: str) -> None:
    """A user error's one `error:` line. A process started by `strop ... --nproc` leaves it in
    `$STROP_ERRORS/<local rank>` (written whole or not at all) and prints nothing: the launcher says
    one line for the run once every process has ended, so which process ends first cannot make it two.
    Any other process prints it."""
    folder = os.environ.get(ERRORS_ENV)
    if not (folder and WORLD.active):
        print(f"error: {message}", file=sys.stderr)
        return
    from strop.core.io import atomic_write_text

    atomic_write_text(Path(folder) / str(WORLD.local_rank), f"error: {message}\n")


def peer_failed(e: BaseException) -> bool:
    """Whether `e` is a collective failing because another process of the run died or stopped."""
    import torch.distributed as dist

    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "gloo", "NCCL")
    )
