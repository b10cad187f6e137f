"""Small device helpers shared by the benchmarks and the spawned ranks: which GPU a rank
uses, and waiting for the device a measurement ran on (not device 0)."""

from __future__ import annotations

import os

import torch


def synchronize(device: torch.device | str) -> None:
    """Wait for the work queued on `device` ("cuda", "cuda:1", a torch.device); a no-op on
    the CPU, whose ops have finished when they return."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def local_cuda_device(local_rank: int) -> torch.device:
    """The GPU of a rank on its node, made the current device so that NCCL and every
    tensor created without a device land on it rather than on GPU 0: GPU `local_rank`,
    or the one GPU a process sees when the launcher gives each rank its own
    (`CUDA_VISIBLE_DEVICES` set per task, as `srun --gpus-per-task=1` does; without it,
    a second rank on a one-GPU node is refused rather than left to collide on GPU 0)."""
    count = torch.cuda.device_count()
    own_gpu = count == 1 and local_rank >= 0 and bool(os.environ.get("CUDA_VISIBLE_DEVICES"))
    index = 0 if own_gpu else local_rank
    if not 0 <= index < count:
        raise ValueError(f"local rank {local_rank} has no GPU: this process sees {count}; "
                         "start at most one rank per GPU (lower --world-size / --nproc-per-node), "
                         "or give each rank its own GPU through CUDA_VISIBLE_DEVICES")
    device = torch.device("cuda", index)
    torch.cuda.set_device(device)
    return device
