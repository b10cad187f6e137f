"""Run a function on N real processes joined by a process group (gloo on CPU by default).

Used by the multi-rank tests and by `fr-trainer bench`. The rendezvous is a FileStore in
a fresh temporary directory: no port is chosen, so runs never collide.

Ranks start with `START_METHOD`: "spawn" (a fresh interpreter per rank, which imports torch:
about 2.3 s per call on a 2-core machine) or "forkserver" (ranks forked from one server
process that imported `FORKSERVER_PRELOAD` once: about 0.06 s per call after the first).
The test suite uses the forkserver (tests/conftest.py); the benchmarks keep "spawn", so a
rank's peak memory is its own process's from its start. Either way a rank sees the caller's
environment as it is at the call (a forked rank would otherwise see the server's).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue as queue_module
import tempfile
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

from fr_trainer.devices import local_cuda_device

START_METHOD = "spawn"  # run_ranks' default; tests/conftest.py sets "forkserver"
FORKSERVER_PRELOAD = ("torch", "torch.distributed", "fr_trainer.heads", "fr_trainer.margins")
START_METHODS = ("spawn", "forkserver")


class RankFailed(RuntimeError):
    """One or more ranks raised; carries every rank's formatted traceback."""

    def __init__(self, errors: dict[int, str]) -> None:
        self.errors = errors
        details = "\n".join(f"--- rank {rank} ---\n{text}" for rank, text in sorted(errors.items()))
        super().__init__(f"{len(errors)} rank(s) failed:\n{details}")


def _worker(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    store_path: str,
    backend: str,
    threads: int,
    results: "mp.Queue[tuple[int, str, Any]]",
    args: tuple,
    environ: dict[str, str] | None = None,
) -> None:
    if environ is not None:  # (a forked rank: the caller's environment, not the server's)
        os.environ.clear()
        os.environ.update(environ)
    torch.set_num_threads(threads)
    try:
        # NCCL: rank r on GPU r (one node), current before the group exists, or its
        # communicators and every tensor made without a device go to GPU 0
        kwargs = {"device_id": local_cuda_device(rank)} if backend == "nccl" else {}
        store = dist.FileStore(store_path, world_size)
        dist.init_process_group(
            backend, store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=120), **kwargs
        )
        try:
            value = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        # Pickle here with the plain pickler: the queue's pickler would share tensor
        # storage through file descriptors that vanish when this process exits.
        results.put((rank, "ok", pickle.dumps(value)))
    except BaseException as error:  # reported to the parent, which raises
        results.put((rank, "error", f"{type(error).__name__}: {error}\n{traceback.format_exc()}"))


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    backend: str = "gloo",
    threads: int = 1,
    timeout_s: float = 300.0,
    start_method: str | None = None,
) -> list[Any]:
    """Call `fn(rank, world_size, *args)` on `world_size` new processes, started by
    `start_method` (default `START_METHOD`).

    `fn` must be importable (a module-level function). Returns the values in rank order;
    raises `RankFailed` with every failing rank's traceback if any rank raised, and
    `TimeoutError` if the ranks have not all answered within `timeout_s`.
    """
    method = start_method or START_METHOD
    if method not in START_METHODS:
        raise ValueError(f"start_method {method!r} is not one of {', '.join(START_METHODS)}")
    context = mp.get_context(method)
    environ = None
    if method == "forkserver":
        context.set_forkserver_preload(list(FORKSERVER_PRELOAD))  # (read when the server starts)
        environ = dict(os.environ)
    results: mp.Queue = context.Queue()
    with tempfile.TemporaryDirectory(prefix="fr_trainer_store_") as directory:
        store_path = os.path.join(directory, "store")
        processes = [
            context.Process(
                target=_worker,
                args=(fn, rank, world_size, store_path, backend, threads, results, args, environ),
                daemon=True,
            )
            for rank in range(world_size)
        ]
        for process in processes:
            process.start()
        values: dict[int, Any] = {}
        errors: dict[int, str] = {}
        deadline = time.monotonic() + timeout_s
        try:
            while len(values) + len(errors) < world_size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    missing = sorted(set(range(world_size)) - set(values) - set(errors))
                    raise TimeoutError(f"ranks {missing} did not finish within {timeout_s:.0f} s")
                try:
                    rank, status, value = results.get(timeout=min(remaining, 1.0))
                except queue_module.Empty:
                    dead = [p for p in processes if p.exitcode not in (None, 0)]
                    if dead and results.empty():
                        codes = {processes.index(p): p.exitcode for p in dead}
                        unanswered = {r: c for r, c in codes.items() if r not in values and r not in errors}
                        if unanswered:
                            errors.update({r: f"process exited with code {c}" for r, c in unanswered.items()})
                    continue
                if status == "ok":
                    values[rank] = pickle.loads(value)
                else:
                    errors[rank] = value
        finally:
            for process in processes:
                process.join(timeout=10)
                if process.is_alive():
                    process.terminate()
                    process.join()
    if errors:
        raise RankFailed(errors)
    return [values[rank] for rank in range(world_size)]
