"""Process-group set-up from the torchrun environment."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from fr_trainer.devices import local_cuda_device

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistributedEnv:
    """What a process learned about its place in the job."""

    rank: int
    world_size: int
    local_rank: int
    backend: str | None  # None: single process, no process group
    device: torch.device

    @property
    def is_distributed(self) -> bool:
        return self.backend is not None


def read_torchrun_env(environ: dict[str, str] | None = None) -> dict[str, str] | None:
    """The torchrun variables, None when none is set; ValueError when only some are."""
    environ = dict(os.environ if environ is None else environ)
    present = {name: environ[name] for name in TORCHRUN_VARIABLES if name in environ}
    if not present:
        return None
    missing = [name for name in TORCHRUN_VARIABLES if name not in present]
    if missing:
        raise ValueError(
            f"incomplete torchrun environment: {', '.join(sorted(present))} set but "
            f"{', '.join(missing)} missing; launch with torchrun (which sets all of "
            f"{', '.join(TORCHRUN_VARIABLES)}) or unset them for a single-process run"
        )
    return present


def default_backend(device_type: str) -> str:
    """NCCL for CUDA devices, gloo otherwise."""
    return "nccl" if device_type == "cuda" else "gloo"


def init_distributed(
    device_type: str | None = None,
    timeout: timedelta = timedelta(minutes=10),
    environ: dict[str, str] | None = None,
) -> DistributedEnv:
    """Initialise the default process group from the torchrun variables.

    With none of them set this is a single-process run: no process group is created and
    the returned env has `backend=None`. `device_type` defaults to "cuda" when CUDA is
    available, else "cpu"; the backend follows it (NCCL on CUDA, gloo on CPU).
    """
    variables = read_torchrun_env(environ)
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if variables is None:
        device = torch.device("cuda", 0) if device_type == "cuda" else torch.device("cpu")
        return DistributedEnv(0, 1, 0, None, device)
    rank, world_size = int(variables["RANK"]), int(variables["WORLD_SIZE"])
    local_rank = int(variables["LOCAL_RANK"])
    backend = default_backend(device_type)
    if device_type == "cuda":
        device = local_cuda_device(local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        kwargs = {"device_id": device} if device_type == "cuda" else {}
        dist.init_process_group(backend=backend, timeout=timeout, **kwargs)
    return DistributedEnv(rank, world_size, local_rank, backend, device)
