"""The tail of a training step (fr_trainer/train/foreach.py and its users: the SGD / AdamW
step, gradient clipping, the EMA update and the BatchNorm snapshot) runs in multi-tensor
ops: the number of aten ops that do work (views aside) does not grow with the number of
parameter tensors, and the numbers are those of the one-tensor-at-a-time rules."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from fr_trainer.heads.step_count import OpCounter
from fr_trainer.train.bench_tail import main as bench_tail
from fr_trainer.train.ema import BackboneEMA
from fr_trainer.train.finiteness import BufferSnapshot
from fr_trainer.train.foreach import CPU_GROUP_BYTES, by_device_and_dtype
from fr_trainer.train.grads import clip_global_norm
from fr_trainer.train.optim import SGD, AdamW


def _network(layers: int) -> nn.Module:
    torch.manual_seed(layers)
    blocks = [m for _ in range(layers) for m in (nn.Linear(6, 6), nn.BatchNorm1d(6), nn.PReLU(6))]
    network = nn.Sequential(*blocks)
    for param in network.parameters():
        param.grad = torch.randn_like(param)
    for module in network.modules():
        if isinstance(module, nn.BatchNorm1d):
            module.running_mean.normal_()
    return network


def _work_ops(action) -> int:
    action()  # (first calls make state: momentum buffers, the snapshot's copies)
    with OpCounter() as counter:
        action()
    return counter.work_ops


STEPS = {
    "sgd": lambda n: SGD(n.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4).step,
    "sgd nesterov": lambda n: SGD(n.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True).step,
    "sgd plain": lambda n: SGD(n.parameters(), lr=0.1, weight_decay=5e-4).step,
    "adamw": lambda n: AdamW(n.parameters(), lr=1e-3, weight_decay=0.05).step,
    "clip": lambda n: lambda: clip_global_norm(list(n.parameters()), [], max_norm=1e-3),
    "ema": lambda n: (lambda ema: lambda: ema.update(n))(BackboneEMA(copy.deepcopy(n), n, 0.99)),
    "snapshot": lambda n: BufferSnapshot([n]).take,
    "restore": lambda n: BufferSnapshot([n]).take().restore,
}


@pytest.mark.parametrize("name", sorted(STEPS))
def test_the_step_tail_makes_as_many_ops_for_thirty_layers_as_for_three(name: str) -> None:
    shallow, deep = _network(3), _network(30)
    assert len(list(deep.parameters())) == 10 * len(list(shallow.parameters()))
    assert _work_ops(STEPS[name](shallow)) == _work_ops(STEPS[name](deep))


def _mixed_params() -> list[nn.Parameter]:
    """Parameters of several shapes (a 0-dim one among them) and two dtypes."""
    torch.manual_seed(0)
    shapes = [(8, 3, 3, 3), (8,), (), (20, 7), (5, 4)]
    params = [nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in shapes]
    params += [nn.Parameter(torch.randn(s)) for s in shapes[:2]]
    return params


OPTIMIZERS = [
    (SGD, torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}),
    (SGD, torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "nesterov": True}),
    (SGD, torch.optim.SGD, {"lr": 0.1, "weight_decay": 5e-4}),
    (AdamW, torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.1}),
]


@pytest.mark.parametrize("ours,theirs,settings", OPTIMIZERS)
def test_many_parameters_of_two_dtypes_in_two_groups_step_as_torch_steps_each(ours, theirs, settings) -> None:
    a = _mixed_params()
    b = [nn.Parameter(p.detach().clone()) for p in a]

    def groups(params):
        return [{"params": params[:3]}, {"params": params[3:], "weight_decay": 0.0}]

    mine, reference = ours(groups(a), **settings), theirs(groups(b), foreach=False, **settings)
    generator = torch.Generator().manual_seed(1)
    for _ in range(5):
        for p, q in zip(a, b):
            grad = torch.randn(p.shape, dtype=p.dtype, generator=generator)
            p.grad, q.grad = grad.clone(), grad.clone()
        mine.step()
        reference.step()
    for p, q in zip(a, b):
        tolerance = 1e-13 if p.dtype == torch.float64 else 1e-6
        torch.testing.assert_close(p.detach(), q.detach(), rtol=tolerance, atol=tolerance)


def test_a_bf16_parameter_steps_with_the_unrounded_momentum_and_decay() -> None:
    """torch's in-place multi-tensor multiply on a CPU rounds its factor to bf16 (0.9 ->
    0.8984375); `mul_` does not. The step must be the one-tensor-at-a-time rule, bit for bit:
    buf = momentum * buf + grad + decay * w; w -= lr * buf."""
    torch.manual_seed(0)
    a = [nn.Parameter(torch.randn(64, dtype=torch.bfloat16)), nn.Parameter(torch.randn(3, 5, dtype=torch.bfloat16))]
    weights = [p.detach().clone() for p in a]
    buffers = [torch.zeros_like(w) for w in weights]
    mine = SGD(a, lr=0.1, momentum=0.9, weight_decay=5e-4)
    for _ in range(3):
        for p, w, buf in zip(a, weights, buffers):
            p.grad = torch.randn_like(p)
            buf.mul_(0.9).add_(p.grad).add_(w, alpha=5e-4)
            w.add_(buf, alpha=-0.1)
        mine.step()
    assert all(torch.equal(p, w) for p, w in zip(a, weights))


def test_the_clipped_norm_of_many_tensors_is_the_float64_norm_of_all_of_them() -> None:
    network = _network(30)
    params = list(network.parameters())
    expected = torch.cat([p.grad.double().flatten() for p in params]).norm()
    before = [p.grad.clone() for p in params]
    norm = clip_global_norm(params, [], max_norm=float(expected) / 2)
    assert norm.dtype == torch.float64
    torch.testing.assert_close(norm, expected, rtol=1e-14, atol=0.0)
    factor = (float(expected) / 2) / (float(expected) + 1e-6)
    for p, old in zip(params, before):
        torch.testing.assert_close(p.grad, old * factor)


def test_a_snapshot_taken_again_restores_the_latest_buffers_and_follows_a_replaced_buffer() -> None:
    network = _network(2)
    batchnorm = network[1]
    snapshot = BufferSnapshot([network, None])
    snapshot.take()
    batchnorm.running_mean.add_(1.0)
    snapshot.take()  # (the second take copies into the first one's tensors)
    latest = batchnorm.running_mean.clone()
    batchnorm.running_mean.mul_(7.0)
    batchnorm.num_batches_tracked += 3
    snapshot.restore()
    assert torch.equal(batchnorm.running_mean, latest) and int(batchnorm.num_batches_tracked) == 0
    batchnorm.running_mean = torch.full((6,), 2.0)  # a module that replaces its buffer
    snapshot.take()
    batchnorm.running_mean.zero_()
    snapshot.restore()
    assert torch.equal(batchnorm.running_mean, torch.full((6,), 2.0))


def test_parallel_lists_group_by_the_first_lists_device_and_dtype_in_order() -> None:
    a = [torch.zeros(1), torch.zeros(1, dtype=torch.float64), torch.ones(1)]
    b = [torch.full((1,), float(i)) for i in range(3)]
    groups = by_device_and_dtype(a, b)
    assert [[float(t) for t in group[1]] for group in groups] == [[0.0, 2.0], [1.0]]
    with pytest.raises(ValueError, match="different lengths"):
        by_device_and_dtype(a, b[:2])


def test_cpu_runs_hold_at_most_a_cache_sized_share_and_other_devices_one_group() -> None:
    """`cpu_runs`: on a CPU the several ops of an update meet their tensors in cache."""
    quarter = CPU_GROUP_BYTES // 4 // 4  # fp32 elements in a quarter of a run
    cpu = [torch.zeros(quarter) for _ in range(9)] + [torch.zeros(5 * quarter), torch.zeros(3)]
    runs = [len(group[0]) for group in by_device_and_dtype(cpu, cpu, cpu_runs=True)]
    assert runs == [4, 4, 1, 1, 1] and len(by_device_and_dtype(cpu)) == 1
    meta = [torch.empty(quarter * 8, device="meta") for _ in range(5)]
    assert len(by_device_and_dtype(meta, cpu_runs=True)) == 1


def test_bench_tail_times_each_part_against_the_one_tensor_loop(tmp_path, capsys) -> None:
    out = tmp_path / "tail.json"
    assert bench_tail(["--backbone", "iresnet18", "--embedding-size", "64", "--iters", "2", "--json", str(out)]) == 0
    results = {r["part"]: r for r in json.loads(out.read_text())["results"]}
    assert sorted(results) == ["clip", "ema", "sgd"]
    assert all(r["ops"] < r["reference_ops"] and r["ms"] > 0 for r in results.values())
    assert "| sgd |" in capsys.readouterr().out
