"""A micro-batch that fits in memory (`train.memory_limit`), at the global batch the config asks for.

The global batch `batch_size x grad_accum` is kept; the micro-batch is the largest divisor of it, no
larger than `batch_size`, whose estimated peak stays under the limit, and accumulation makes up the
rest, so the losses are those of the configured run (accumulation is exact: training/step.py). The
estimate is measured, not guessed: one forward and backward pass over the 1 and then the 2 longest
training examples, each peak read from the process (Linux's VmHWM, reset through clear_refs; on CUDA
the allocator's peak), a line through the two, plus the optimizer's state (AdamW keeps two numbers
per trainable weight) and a margin. The choice is written to `memory.json` in the run folder and a
resumed run takes it from there, so its batches are those of the run it resumes.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path

import torch

from strop.core.errors import ConfigError
from strop.core.io import atomic_write_json
from strop.core.sizes import parse_bytes  # noqa: F401 - what memory_limit is read with

log = logging.getLogger("strop")
MARGIN = 0.9  # the estimate may reach this share of the limit


def free_bytes(device: torch.device) -> int:
    """What this process may use: the memory the machine has available plus what the process holds."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_allocated(device))
    info = Path("/proc/meminfo").read_text()
    available = int(re.search(r"MemAvailable:\s+(\d+) kB", info).group(1)) * 1024  # type: ignore[union-attr]
    return available + _status_kb("VmRSS") * 1024


def _status_kb(field: str) -> int:
    found = re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text())
    return int(found.group(1)) if found else 0


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
    except OSError:
        pass


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return _status_kb("VmHWM") * 1024


def choose(global_batch: int, largest: int, peak_of: Callable[[int], int], fixed: int, limit: int) -> dict:
    """The largest micro-batch m (a divisor of `global_batch`, at most `largest`) whose estimated peak
    `peak_of(1) + (m - 1) x per_example + fixed` is within MARGIN of `limit`. `peak_of(0)` is the
    process before any pass. per_example is the larger of what the second example added and what the
    first one added to that: after a first pass the allocator keeps its freed memory resident, and a
    second pass reuses it, so the difference of the two peaks alone understated a SmolLM2 run's
    per-example memory by ~40% (estimated 8.4 GiB, measured 12.6 GiB at micro-batch 8)."""
    base, one = peak_of(0), peak_of(1)
    two = peak_of(2) if global_batch > 1 and largest > 1 else one
    per_example = max(0, two - one, one - base)
    fits = [
        m
        for m in range(1, min(largest, global_batch) + 1)
        if global_batch % m == 0 and one + (m - 1) * per_example + fixed <= MARGIN * limit
    ]
    estimate = {
        "before": base,
        "peak_one": one,
        "per_example": per_example,
        "optimizer": fixed,
        "limit": limit,
    }
    if not fits:
        need = (one + fixed) / 2**30
        raise ConfigError(
            f"train.memory_limit: one example per micro-batch already needs ~{need:.1f} GiB with the optimizer "
            f"(limit {limit / 2**30:.1f} GiB); set train.gradient_checkpointing: true, lower data.max_length, "
            "or use LoRA"
        )
    m = max(fits)
    return {
        "micro_batch": m,
        "grad_accum": global_batch // m,
        "estimated_peak": one + (m - 1) * per_example + fixed,
        **estimate,
    }


def probe(model, objective, ts, lengths, pad_id: int, device: torch.device) -> Callable[[int], int]:
    """peak_of(m): the process's peak over one forward and backward pass of the m longest examples."""
    longest = sorted(range(len(lengths)), key=lambda i: -lengths[i])

    def peak_of(m: int) -> int:
        if m == 0:  # the process as it is, before a pass
            reset_peak(device)
            return peak_bytes(device)
        batch = objective.collate(ts, longest[:m], pad_id)
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        reset_peak(device)
        objective.loss(model, batch).total.backward()
        peak = peak_bytes(device)
        model.zero_grad(set_to_none=True)
        return peak

    return peak_of


def optimizer_bytes(model) -> int:
    """AdamW's two moments and the gradient of every trainable weight."""
    return sum(3 * p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def fit_batch(
    train, run_dir: Path, device: torch.device, probing: Callable[[], Callable[[int], int]], model
) -> dict:
    """The micro-batch and accumulation to train with: the resumed run's (memory.json), or chosen now
    from the probe `probing()` makes."""
    saved = run_dir / "memory.json"
    if saved.is_file():
        return json.loads(saved.read_text())
    limit = train.memory_limit_bytes or free_bytes(device)
    global_batch = train.batch_size * train.grad_accum
    choice = choose(global_batch, train.batch_size, probing(), optimizer_bytes(model), limit)
    log.info(
        "memory: micro-batch %d x accumulation %d (global batch %d as configured), estimated peak %.1f GiB "
        "of the %.1f GiB limit",
        choice["micro_batch"],
        choice["grad_accum"],
        train.batch_size * train.grad_accum,
        choice["estimated_peak"] / 2**30,
        limit / 2**30,
    )
    return choice


def keep(choice: dict, run_dir: Path) -> None:
    atomic_write_json(run_dir / "memory.json", choice)
