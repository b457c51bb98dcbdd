"""`train.parallel: fsdp`: the transformer blocks sharded over the processes with torch's FSDP2.

Each block's weights, gradients and optimizer state live as 1/N of every tensor on each process (a
DTensor sharded on dim 0); a block's forward gathers its full weights just in time and frees them after,
and its backward reduce-scatters the gradients, summed (not averaged), so the loop's rule holds: the
step's gradient is the sum over every process's units divided by their count (training/loop.py).

What is not inside a block (embeddings, the final norm, the LM head or a classifier head) stays whole on
every process and is summed like DDP's gradients: the fused LM-head loss (methods/lm_loss.py) reads the
head's weight directly, outside any forward FSDP could hook. With tied embeddings that part is the
vocabulary matrix (SmolLM2-135M: 28M of 135M parameters); for 1B+ models it is a few percent.

One process is the world of size 1: nothing is sharded and checkpoints are the plain ones.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from strop.core import distributed
from strop.core.errors import ConfigError


def is_sharded(t: torch.Tensor | None) -> bool:
    if not distributed.WORLD.active:  # one process never holds DTensors: no import of torch.distributed
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def model_is_sharded(model: nn.Module) -> bool:
    return any(is_sharded(p) for p in model.parameters())


def block_classes(model: nn.Module) -> set[str]:
    """The class names transformers lists as its blocks (`_no_split_modules`), over every model inside
    `model` (a peft wrapper, a classifier around a backbone)."""
    names: set[str] = set()
    for m in model.modules():
        names |= set(getattr(m, "_no_split_modules", None) or [])
    return names


def shard(model: nn.Module, device: torch.device) -> int:
    """Shard every transformer block of `model` over the processes (in place); returns how many."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    classes = block_classes(model)
    blocks = [m for m in model.modules() if type(m).__name__ in classes]
    blocks = [b for b in blocks if not any(b is not o and _contains(o, b) for o in blocks)]  # outermost
    if not blocks:
        raise ConfigError(
            f"train.parallel: fsdp found no transformer blocks to shard in {type(model).__name__} "
            "(transformers lists none in _no_split_modules); use train.parallel: ddp"
        )
    mesh = init_device_mesh(device.type, (distributed.WORLD.size,))
    for block in blocks:
        fully_shard(block, mesh=mesh)
        block.set_gradient_divide_factor(1.0)  # type: ignore[operator]  # sums, as the loop divides itself
        block.set_force_sum_reduction_for_comms(True)  # type: ignore[operator]  # plain SUM: gloo has no PREMUL_SUM
    # The root: the innermost module whose forward runs every block (LlamaModel, BertEncoder's parent),
    # managing none of its own weights. Without it each block would be a root, and a root keeps its
    # weights gathered from forward to backward: the whole model on every process.
    root = _innermost_holder(model, blocks)
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    whole = [p for p in model.parameters() if id(p) not in in_blocks]
    fully_shard(root, mesh=mesh, ignored_params={p for p in whole if any(p is q for q in root.parameters())})
    # The loaded weights may be views of one memory-mapped file, which stays mapped (and resident, as
    # far as the copies into shards touched it) while any view lives: own copies of the whole weights
    # let it go, so a process holds its shards and the whole part, not the file besides.
    with torch.no_grad():
        for p in whole:
            p.data = p.data.clone()
    return len(blocks)


def _contains(outer: nn.Module, inner: nn.Module) -> bool:
    return any(m is inner for m in outer.modules())


def _innermost_holder(model: nn.Module, blocks: list[nn.Module]) -> nn.Module:
    containers = (nn.ModuleList, nn.ModuleDict)
    holder = model
    for m in model.modules():
        if not isinstance(m, containers) and all(_contains(m, b) for b in blocks) and _contains(holder, m):
            holder = m
    return holder


def clip_gradients(params: list[nn.Parameter], max_norm: float) -> float:
    """Clip to a total L2 norm of `max_norm` over all processes; returns the norm before clipping (the
    same on every process). Sharded gradients add their shards' squares across processes; whole ones
    are already equal everywhere."""
    grads: list[torch.Tensor] = [p.grad for p in params if p.grad is not None]
    sharded = [g.to_local() for g in grads if is_sharded(g)]  # type: ignore[attr-defined]  # DTensors
    whole = [g for g in grads if not is_sharded(g)]
    sq = float(sum(float(g.float().pow(2).sum()) for g in sharded))
    sq = distributed.sum_floats([sq], grads[0].device if grads else torch.device("cpu"))[0]
    sq += float(sum(float(g.float().pow(2).sum()) for g in whole))
    norm = math.sqrt(sq) if math.isfinite(sq) else math.nan
    if math.isfinite(norm) and norm > max_norm:
        coef = max_norm / (norm + 1e-6)
        for g in grads:
            g.mul_(coef)
    return norm


def gather_into(model: nn.Module, whole: nn.Module | None) -> None:
    """Copy the trained weights of sharded `model` into `whole`, an unsharded model of the same build
    (rank 0's; None on the others, which only take part in the gathers). One tensor is whole at a time,
    so the peak is `whole` plus one weight, not a second copy of the model."""
    params = dict(whole.named_parameters()) if whole is not None else {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue  # frozen weights are the base's, as `whole` was built
            t = p.detach().full_tensor() if is_sharded(p) else p.detach()  # type: ignore[attr-defined]
            if whole is not None:
                params[name].copy_(t)
            del t


def like(target: torch.Tensor | None, full: torch.Tensor) -> torch.Tensor:
    """`full` laid out as `target` when `target` is a DTensor of its shape (this process's rows of it);
    otherwise `full` as it is."""
    if target is None or not is_sharded(target) or tuple(target.shape) != tuple(full.shape):
        return full
    from torch.distributed.tensor import distribute_tensor

    t = target  # a DTensor
    return distribute_tensor(full.to(t.dtype), t.device_mesh, t.placements)  # type: ignore[attr-defined]
