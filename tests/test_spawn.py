"""`run_ranks` (fr_trainer/distributed/spawn.py) under both start methods: ranks answer in
rank order from processes of their own, joined by one process group, and see the caller's
environment as it is at the call, also when the forkserver was started before it changed."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from fr_trainer.distributed.spawn import RankFailed, run_ranks

VARIABLE = "FR_TEST_SPAWN_VALUE"


def _report(rank: int, world_size: int) -> tuple[int, int, str | None, int, float]:
    total = torch.tensor([float(rank + 1)])
    dist.all_reduce(total)
    return rank, world_size, os.environ.get(VARIABLE), os.getpid(), float(total)


def _fail_on_rank_one(rank: int, world_size: int) -> None:
    if rank == 1:
        raise ValueError("rank one refuses")


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_ranks_answer_in_order_with_the_callers_environment_at_the_call(method: str, monkeypatch) -> None:
    monkeypatch.setenv(VARIABLE, "before")
    first = run_ranks(_report, 2, start_method=method)  # (starts the forkserver, if it is not running)
    monkeypatch.setenv(VARIABLE, "after")
    second = run_ranks(_report, 3, start_method=method)
    assert [(r, w, v, s) for r, w, v, _, s in first] == [(0, 2, "before", 3.0), (1, 2, "before", 3.0)]
    assert [(r, w, v, s) for r, w, v, _, s in second] == [(r, 3, "after", 6.0) for r in range(3)]
    pids = [pid for *_, pid, _ in first + second] + [os.getpid()]
    assert len(set(pids)) == len(pids)  # every rank its own process


def test_a_failing_rank_is_reported_and_an_unknown_start_method_is_refused() -> None:
    with pytest.raises(RankFailed, match="rank one refuses"):
        run_ranks(_fail_on_rank_one, 2, start_method="forkserver")
    with pytest.raises(ValueError, match="'fork' is not one of spawn, forkserver"):
        run_ranks(_report, 2, start_method="fork")
