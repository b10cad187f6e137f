"""Collectives used by the head, each taking its process group explicitly.

`process_group=None` means the default group when one is initialised; with no
initialised process group every function here is the single-process identity.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

# torch renamed the single-tensor collectives (all_gather_into_tensor -> all_gather_single);
# use whichever this torch has, without the deprecation warning of the old name.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def is_distributed(group: ProcessGroup | None) -> bool:
    """True when collectives over `group` have more than one participant."""
    if group is not None:
        return dist.get_world_size(group) > 1
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world_size(group: ProcessGroup | None) -> tuple[int, int]:
    """(rank, world size) in `group`; (0, 1) without an initialised process group."""
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def backend_name(group: ProcessGroup | None) -> str:
    return str(dist.get_backend(group)).lower()


def all_gather_tensor(tensor: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Concatenate equal-shaped tensors of all ranks along dim 0, in rank order (no grad)."""
    if not is_distributed(group):
        return tensor
    world_size = dist.get_world_size(group)
    tensor = tensor.contiguous()
    out = tensor.new_empty((world_size * tensor.shape[0], *tensor.shape[1:]))
    _all_gather_single(out, tensor, group=group)
    return out


def reduce_scatter_sum(tensor: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Sum `tensor` [world*B, ...] over ranks and return this rank's rows [B, ...]."""
    if not is_distributed(group):
        return tensor
    rank, world_size = rank_and_world_size(group)
    rows = tensor.shape[0] // world_size
    tensor = tensor.contiguous()
    if backend_name(group) == "nccl":
        out = tensor.new_empty((rows, *tensor.shape[1:]))
        _reduce_scatter_single(out, tensor, op=dist.ReduceOp.SUM, group=group)
        return out
    # gloo has no reduce-scatter: reduce everything, keep our rows.
    tensor = tensor.clone()
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor[rank * rows : (rank + 1) * rows].clone()


def all_reduce_(tensor: torch.Tensor, op: dist.ReduceOp, group: ProcessGroup | None) -> torch.Tensor:
    """In-place all-reduce; the identity without a process group."""
    if is_distributed(group):
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


class _AllGatherWithGrad(torch.autograd.Function):
    """Forward: all-gather rows. Backward: each rank gets the gradient of its own rows,
    summed over every rank's contribution (a reduce-scatter)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
        ctx.group = group
        return all_gather_tensor(tensor, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return reduce_scatter_sum(grad, ctx.group), None


def all_gather_with_grad(tensor: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """All-gather `tensor` [B, ...] -> [world*B, ...] with autograd.

    The gradient returned to each rank is d(loss)/d(own rows) where the loss is the same
    scalar on every rank and each rank back-propagates the part of it that it computed.
    """
    if not is_distributed(group):
        return tensor
    return _AllGatherWithGrad.apply(tensor, group)


def all_reduce_max_int(value: int, group: ProcessGroup | None, device: torch.device) -> int:
    """The largest `value` over the ranks (one int: a CPU tensor on gloo, a `device` one on
    NCCL); `value` itself without a process group."""
    if not is_distributed(group):
        return int(value)
    return int(_max_over_ranks(torch.tensor([int(value)], dtype=torch.int64, device=device), group).item())


def _max_over_ranks(tensor: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """The element-wise MAX of `tensor` over the ranks, on `tensor`'s device (reduced on
    the CPU for gloo)."""
    where = tensor if backend_name(group) == "nccl" else tensor.cpu()
    dist.all_reduce(where, op=dist.ReduceOp.MAX, group=group)
    return where.to(tensor.device)


def any_rank_flags(flags: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """The element-wise MAX of a small float tensor of 0/1 flags over the ranks (on the CPU
    for gloo, where it is); `flags` itself without a process group. No host read: the
    caller reads the result together with whatever else it needs this step."""
    return _max_over_ranks(flags, group) if is_distributed(group) else flags
