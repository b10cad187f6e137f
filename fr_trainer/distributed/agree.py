"""Small decisions every rank must take together (checkpoint choice, finiteness, disk space).

Each function is a collective over `group` (None: the default group) when a process group
with more than one rank is initialised, and the single-process identity otherwise. None
raises before its collective, so one rank's bad news cannot leave the others waiting.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from fr_trainer.distributed.collectives import is_distributed


def _device(group: ProcessGroup | None) -> torch.device:
    """Where a collective's tensor must live: CUDA for NCCL, else CPU."""
    if str(dist.get_backend(group)).lower() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_true(flag: bool, group: ProcessGroup | None = None) -> bool:
    """True on every rank iff `flag` is True on every rank."""
    if not is_distributed(group):
        return bool(flag)
    value = torch.tensor([1 if flag else 0], dtype=torch.int64, device=_device(group))
    dist.all_reduce(value, op=dist.ReduceOp.MIN, group=group)
    return bool(value.item())


def sum_int(value: int, group: ProcessGroup | None = None) -> int:
    """The sum of `value` over the ranks, on every rank."""
    if not is_distributed(group):
        return int(value)
    total = torch.tensor([int(value)], dtype=torch.int64, device=_device(group))
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return int(total.item())


def gather_strings(text: str, group: ProcessGroup | None = None) -> list[str]:
    """Every rank's `text` (utf-8), in rank order, on every rank (tensors, not pickles)."""
    if not is_distributed(group):
        return [text]
    device = _device(group)
    world = dist.get_world_size(group)
    data = torch.tensor(list(text.encode("utf-8")), dtype=torch.uint8, device=device)
    length = torch.tensor([data.numel()], dtype=torch.int64, device=device)
    lengths = [torch.zeros_like(length) for _ in range(world)]
    dist.all_gather(lengths, length, group=group)
    longest = max(int(n.item()) for n in lengths)
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[: data.numel()] = data
    pieces = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(pieces, padded, group=group)
    return [
        bytes(p[: int(n.item())].cpu().tolist()).decode("utf-8") for p, n in zip(pieces, lengths)
    ]
