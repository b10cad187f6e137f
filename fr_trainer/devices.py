"""Small device helpers shared by the benchmarks and the spawned ranks: which GPU a rank
uses, and waiting for the device a measurement ran on (not device 0)."""

from __future__ import annotations

import torch


def synchronize(device: torch.device | str) -> None:
    """Wait for the work queued on `device` ("cuda", "cuda:1", a torch.device); a no-op on
    the CPU, whose ops have finished when they return."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def local_cuda_device(local_rank: int) -> torch.device:
    """The GPU of a rank on its node, made the current device so that NCCL and every
    tensor created without a device land on it rather than on GPU 0."""
    count = torch.cuda.device_count()
    if not 0 <= local_rank < count:
        raise ValueError(f"local rank {local_rank} has no GPU: this node has {count}; "
                         "start at most one rank per GPU (lower --world-size / --nproc-per-node)")
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    return device
