"""Multi-tensor (foreach) arithmetic for the tail of a training step.

Gradient clipping, the optimizer, the EMA and the BatchNorm snapshot each touch every
parameter or buffer tensor. Written as one op per tensor, iresnet50's step tail issues
about 4,000 aten ops (238 parameters, 237 buffers); on a GPU each is a kernel launch with
its host overhead, issued after the step's one host read while the device waits. torch's
`_foreach_*` ops take lists: one op per list, which CUDA runs as a few multi-tensor
kernels (on a CPU, a loop in C++ over the same kernels, so the numbers are the same).

The fast CUDA kernels need every tensor of a call on one device with one dtype:
`by_device_and_dtype` splits parallel lists into such groups. For the updates that make
several ops over the same tensors (SGD's four, AdamW's dozen, the EMA's two) it also cuts
them, on a CPU, into runs of about `CPU_GROUP_BYTES` (`cpu_runs=True`), so that each op
finds its tensors still in cache: one op per whole list streams every tensor through
memory once per op (iresnet50's SGD step, one thread: 45 ms one tensor at a time, 60 ms as
one list, 45 ms in runs of 1 MB).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

CPU_GROUP_BYTES = 1 << 20  # bytes of the first list's tensors per group on a CPU


def by_device_and_dtype(*lists: Sequence[torch.Tensor], cpu_runs: bool = False) -> list[tuple[list[torch.Tensor], ...]]:
    """Parallel lists split into groups whose tensors of the first list share a device and
    a dtype (their order kept); each group is a tuple of lists, one per input list. With
    `cpu_runs`, a CPU group holds at most CPU_GROUP_BYTES of the first list (or one larger
    tensor)."""
    if not lists:
        return []
    size = len(lists[0])
    if any(len(other) != size for other in lists):
        raise ValueError(f"parallel lists of different lengths: {[len(other) for other in lists]}")
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, first in enumerate(lists[0]):
        groups.setdefault((first.device, first.dtype), []).append(i)
    runs = [run for (device, _), members in groups.items()
            for run in (_runs(members, lists[0]) if cpu_runs and device.type == "cpu" else [members])]
    return [tuple([source[i] for i in run] for source in lists) for run in runs]


def _runs(members: list[int], tensors: Sequence[torch.Tensor]) -> list[list[int]]:
    """`members` cut into runs of at most CPU_GROUP_BYTES of `tensors` (or one larger one)."""
    runs, run, size = [], [], 0
    for i in members:
        nbytes = tensors[i].numel() * tensors[i].element_size()
        if run and size + nbytes > CPU_GROUP_BYTES:
            runs.append(run)
            run, size = [], 0
        run.append(i)
        size += nbytes
    return runs + [run]


def copy_all_(destinations: Sequence[torch.Tensor], sources: Sequence[torch.Tensor]) -> None:
    """destinations[i].copy_(sources[i]) for every i, one op per (device, dtype) group."""
    for targets, values in by_device_and_dtype(destinations, sources):
        torch._foreach_copy_(targets, values)


def scale_(tensors: list[torch.Tensor], factor: float) -> None:
    """tensors[i].mul_(factor) for tensors of one device and dtype. 16-bit ones go one at a
    time: on a CPU torch's in-place foreach multiply rounds the factor to the tensors' dtype
    first (0.9 becomes 0.8984375 in bf16), where `mul_` multiplies in fp32."""
    if tensors and tensors[0].dtype in (torch.float16, torch.bfloat16):
        for tensor in tensors:
            tensor.mul_(factor)
    else:
        torch._foreach_mul_(tensors, factor)
