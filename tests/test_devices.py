"""fr_trainer/devices.py: a rank's GPU is made current (so NCCL and device-less tensors do
not land on GPU 0) and a bad local rank is refused with the fix named; `synchronize` waits
on the device it is given. The CUDA calls are recorded through monkeypatched stand-ins: this
suite runs on machines without a GPU."""

from __future__ import annotations

import pytest
import torch

from fr_trainer import devices
from fr_trainer.distributed.spawn import RankFailed, run_ranks


def _fake_node(monkeypatch, gpus: int) -> dict[str, list]:
    calls: dict[str, list] = {"set_device": [], "synchronize": []}
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls["set_device"].append(d))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: calls["synchronize"].append(d))
    return calls


def test_a_ranks_gpu_is_its_local_rank_and_becomes_current(monkeypatch) -> None:
    calls = _fake_node(monkeypatch, gpus=4)
    assert devices.local_cuda_device(3) == torch.device("cuda", 3)
    assert calls["set_device"] == [torch.device("cuda", 3)]


def test_a_rank_given_its_own_gpu_uses_it_whatever_its_local_rank(monkeypatch) -> None:
    calls = _fake_node(monkeypatch, gpus=1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")  # set per task by the launcher
    assert devices.local_cuda_device(5) == torch.device("cuda", 0)
    assert calls["set_device"] == [torch.device("cuda", 0)]


def test_a_second_rank_on_a_one_gpu_node_is_refused(monkeypatch) -> None:
    _fake_node(monkeypatch, gpus=1)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert devices.local_cuda_device(0) == torch.device("cuda", 0)
    with pytest.raises(ValueError, match="local rank 1 has no GPU: this process sees 1"):
        devices.local_cuda_device(1)


@pytest.mark.parametrize("local_rank", [-1, 4])
def test_a_local_rank_without_a_gpu_is_refused_with_the_fix(monkeypatch, local_rank: int) -> None:
    calls = _fake_node(monkeypatch, gpus=4)
    with pytest.raises(ValueError, match=rf"local rank {local_rank} has no GPU: this process sees 4.*at most one rank"):
        devices.local_cuda_device(local_rank)
    assert calls["set_device"] == []


def test_synchronize_waits_on_the_device_it_is_given_and_not_on_the_cpu(monkeypatch) -> None:
    calls = _fake_node(monkeypatch, gpus=2)
    devices.synchronize("cpu")
    devices.synchronize(torch.device("cpu"))
    assert calls["synchronize"] == []
    devices.synchronize("cuda:1")
    devices.synchronize(torch.device("cuda", 0))
    assert calls["synchronize"] == [torch.device("cuda", 1), torch.device("cuda", 0)]


def _never_runs(rank: int, world_size: int) -> None:
    raise AssertionError("the rank ran without a GPU")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_nccl_ranks_take_their_gpu_before_the_group_starts() -> None:
    with pytest.raises(RankFailed, match="local rank 0 has no GPU: this process sees 0"):
        run_ranks(_never_runs, 1, backend="nccl", timeout_s=60)
