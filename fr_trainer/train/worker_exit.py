"""How a training process ends: process groups torn down while Python is whole, and, for a
worker started by torchrun, no C++ teardown after the run's outcome is decided.

A finished run once exited with SIGABRT ("terminate called without an active exception")
in CI, after its last step had been logged and its checkpoint written: the message of a
C++ std::thread destroyed while still joinable, during interpreter finalization (most
likely gloo's or the TCPStore client's; not reproduced here in 14 runs). torchrun reads
such an exit as a failed worker and restarts or fails the whole job. So:

1. `release_distributed(...)` drops the trainer (the DDP reducer, the head and the stop
   request hold the process group) and collects it before `destroy_process_group`, so
   the backend's threads are joined while the interpreter is alive;
2. `exit_worker(status)` is the last call of `fr-trainer train`: under a torchrun agent
   (`TORCHELASTIC_RUN_ID` set) it flushes stdout/stderr and leaves with `os._exit`,
   skipping static destructors; elsewhere (tests calling `main`, a plain
   `fr-trainer train`) it returns the status unchanged.

Everything the run must keep (checkpoints, summary.json, TensorBoard events) is written and
closed by `Trainer.fit` before either step.
"""

from __future__ import annotations

import gc
import os
import sys


def under_torchrun() -> bool:
    """True in a worker process that a torchrun (torchelastic) agent started."""
    return "TORCHELASTIC_RUN_ID" in os.environ and "LOCAL_RANK" in os.environ


def release_distributed() -> None:
    """Collect unreachable trainers, then destroy every process group (if any)."""
    gc.collect()
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()


def exit_worker(status: int) -> int:
    """Return `status`, or, in a torchrun worker, end the process with it now."""
    if not under_torchrun():
        return status
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing left to flush
            pass
    os._exit(status)
