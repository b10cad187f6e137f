"""Gradient plumbing: the world-size factor for DDP, and global-norm clipping.

`PartialFC` returns the exact gradient of the (replicated) loss w.r.t. each rank's local
embeddings; the true backbone gradient is the SUM over ranks of those contributions, but
DDP AVERAGES. `scale_backbone_grad(embeddings, world_size)` multiplies the gradient that
flows into the backbone by the world size, so DDP's mean becomes the sum: this is the one
place where that factor lives.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

from fr_trainer.train.foreach import by_device_and_dtype


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.factor, None


def scale_backbone_grad(embeddings: torch.Tensor, world_size: int) -> torch.Tensor:
    """Identity forward; backward multiplies the gradient by `world_size` (DDP mean -> sum)."""
    if world_size == 1:
        return embeddings
    return _ScaleGrad.apply(embeddings, float(world_size))


SQUARE_SUM_BLOCK = 1 << 20  # elements upcast to float64 at a time


def _float64_square_sum(tensor: torch.Tensor) -> torch.Tensor:
    """sum(tensor^2) accumulated in float64, upcasting one block at a time (a whole
    float64 copy of a 10M-class head gradient would be twice the gradient's size)."""
    flat = tensor.reshape(-1)
    total = torch.zeros((), dtype=torch.float64, device=tensor.device)
    for start in range(0, flat.numel(), SQUARE_SUM_BLOCK):
        block = flat[start : start + SQUARE_SUM_BLOCK]
        total += torch.linalg.vector_norm(block, dtype=torch.float64).square()
    return total


def _square_sum(params: Iterable[torch.nn.Parameter], device: torch.device, blocks: bool) -> torch.Tensor:
    """sum of grad^2 over `params` in float64, in one multi-tensor norm per (device, dtype)
    (a backbone's hundreds of tensors), except, with `blocks`, the tensors of more than
    SQUARE_SUM_BLOCK elements (a head shard), which are upcast a block at a time. (On a CPU
    the float64 norm upcasts a tensor whole, which is slower than blocks for the large ones,
    so there they always go by blocks.)"""
    total = torch.zeros((), dtype=torch.float64, device=device)
    grads = [p.grad.coalesce().values() if p.grad.is_sparse else p.grad for p in params if p.grad is not None]
    large = [g for g in grads if blocks and g.numel() > SQUARE_SUM_BLOCK]
    small = [g for g in grads if not (blocks and g.numel() > SQUARE_SUM_BLOCK)]
    for (group,) in by_device_and_dtype(small):
        norms = torch._foreach_norm(group, 2, dtype=torch.float64)
        total = total + torch.stack(norms).square().sum()
    for g in large:
        total = total + _float64_square_sum(g.detach())
    return total


def clip_global_norm(
    replicated: list[torch.nn.Parameter],
    sharded: list[torch.nn.Parameter],
    max_norm: float,
    group=None,
) -> torch.Tensor:
    """Clip the gradient norm of the whole model: replicated parameters (the backbone,
    identical on every rank after DDP) counted once, sharded ones (the head) summed over
    ranks. Returns the norm before clipping (same on every rank), a float64 tensor on the
    device: nothing here reads the host, so clipping adds no sync to a step. The gradients
    are multiplied on the device by max_norm / (norm + 1e-6) when the norm exceeds the
    bound, and by exactly 1 otherwise, which leaves them as they were."""
    device = next((p.device for p in (*sharded, *replicated)), torch.device("cpu"))
    local = _square_sum(sharded, device, blocks=True)
    on_cpu = device.type == "cpu"
    if sharded and dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(local, group=group)
    norm = (_square_sum(replicated, device, blocks=on_cpu) + local).sqrt()
    if max_norm > 0:
        # (exactly the host rule "scale by max / (norm + 1e-6) when norm > max", on the device)
        factor = torch.where(norm > max_norm, max_norm / (norm + 1e-6), torch.ones_like(norm))
        # in place, sparse ones through their values (a new sparse tensor each step would
        # defeat the reuse of the head's gradient pages)
        grads = [p.grad._values() if p.grad.is_sparse else p.grad for p in (*replicated, *sharded)
                 if p.grad is not None]
        for (alike,) in by_device_and_dtype(grads):
            torch._foreach_mul_(alike, factor.to(alike[0].dtype))
    return norm
