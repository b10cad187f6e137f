"""Partial-FC sampling: positives kept, rate ~1 equals the full head, sparse updates."""

from __future__ import annotations

import pytest
import torch
from head_reference import reference_loss

from fr_trainer.distributed.shard import ClassShard
from fr_trainer.distributed.spawn import run_ranks
from fr_trainer.heads import PartialFC, num_sampled, sample_centres
from fr_trainer.heads.init import init_centres
from fr_trainer.train.optim import SGD, AdamW

NUM_CLASSES, DIM, BATCH, SEED = 1003, 16, 8, 5


def test_positives_always_sampled() -> None:
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        positives = torch.unique(torch.randint(0, 500, (40,), generator=generator))
        index = sample_centres(positives, 500, 50, generator)
        assert index.numel() == 50
        assert torch.isin(positives, index).all()
        assert torch.equal(index, torch.unique(index))  # sorted, no repeats
    many = torch.arange(0, 500, 5)  # more positives (100) than slots (50): all kept
    assert torch.equal(sample_centres(many, 500, 50, generator), many)


def test_negatives_are_uniform() -> None:
    generator = torch.Generator().manual_seed(1)
    counts = torch.zeros(200, dtype=torch.float64)
    positives = torch.tensor([0, 1, 2])
    for _ in range(2000):
        counts[sample_centres(positives, 200, 23, generator)] += 1
    assert (counts[:3] == 2000).all()
    negatives = counts[3:] / 2000  # each negative drawn with probability 20 / 197
    assert abs(float(negatives.mean()) - 20 / 197) < 1e-9
    assert float((negatives - 20 / 197).abs().max()) < 0.035


def test_num_sampled_validates_rate() -> None:
    assert num_sampled(1000, 0.1) == 100
    assert num_sampled(3, 0.01) == 1
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="sample_rate"):
            num_sampled(10, bad)


def test_sampling_at_rate_one_equals_full_head() -> None:
    torch.manual_seed(0)
    x = torch.randn(BATCH, DIM, dtype=torch.float64)
    y = torch.randint(0, NUM_CLASSES, (BATCH,))
    full = PartialFC(NUM_CLASSES, DIM, seed=SEED).double()
    sampled = PartialFC(NUM_CLASSES, DIM, seed=SEED, sample_rate=1 - 1e-12).double()
    assert sampled.sampling and sampled.num_sample == NUM_CLASSES
    results = []
    for head in (full, sampled):
        xi = x.clone().requires_grad_()
        loss = head(xi, y)
        loss.backward()
        grad = head.weight.grad.to_dense() if head.weight.grad.is_sparse else head.weight.grad
        results.append((loss.detach(), xi.grad, grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_unsampled_centres_and_state_unchanged(optimizer: str) -> None:
    torch.manual_seed(0)
    head = PartialFC(NUM_CLASSES, DIM, seed=SEED, sample_rate=0.1)
    backbone = torch.nn.Linear(DIM, DIM)
    params = list(backbone.parameters()) + list(head.parameters())
    opt = SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4) if optimizer == "sgd" \
        else AdamW(params, lr=0.01, weight_decay=0.05)
    for _ in range(3):
        before_w = head.weight.detach().clone()
        state = opt.state.get(head.weight, {})
        before_state = {k: v.clone() for k, v in state.items() if torch.is_tensor(v)}
        y = torch.randint(0, NUM_CLASSES, (BATCH,))
        opt.zero_grad(set_to_none=True)
        head(backbone(torch.randn(BATCH, DIM)), y).backward()
        assert head.weight.grad.is_sparse
        opt.step()
        used = head.last_index
        assert torch.isin(y, used).all()
        unused = torch.ones(NUM_CLASSES, dtype=torch.bool)
        unused[used] = False
        assert torch.equal(head.weight.detach()[unused], before_w[unused])
        assert not torch.equal(head.weight.detach()[used], before_w[used])
        for key, value in opt.state[head.weight].items():
            if key in before_state:
                assert torch.equal(value[unused], before_state[key][unused]), key


def test_sparse_step_matches_dense_step_on_used_rows() -> None:
    """On the rows it touches, the sparse SGD step is exactly the dense step."""
    torch.manual_seed(0)
    weight = torch.randn(50, 4, dtype=torch.float64)
    rows = torch.tensor([3, 7, 20])
    grad_rows = torch.randn(3, 4, dtype=torch.float64)
    sparse_param = torch.nn.Parameter(weight.clone())
    dense_param = torch.nn.Parameter(weight[rows].clone())
    sparse_opt = SGD([sparse_param], lr=0.1, momentum=0.9, weight_decay=0.01)
    dense_opt = torch.optim.SGD([dense_param], lr=0.1, momentum=0.9, weight_decay=0.01)
    for _ in range(3):
        sparse_param.grad = torch.sparse_coo_tensor(rows[None], grad_rows, (50, 4))
        dense_param.grad = grad_rows.clone()
        sparse_opt.step()
        dense_opt.step()
    assert torch.equal(sparse_param.detach()[rows], dense_param.detach())


def _sampled_rank(rank: int, world_size: int) -> dict:
    generator = torch.Generator().manual_seed(SEED)
    x_all = torch.randn(world_size * BATCH, DIM, generator=generator, dtype=torch.float64)
    y_all = torch.randint(0, NUM_CLASSES, (world_size * BATCH,), generator=generator)
    head = PartialFC(NUM_CLASSES, DIM, margin="cosface", seed=SEED, sample_rate=0.2, chunk_size=40).double()
    rows = slice(rank * BATCH, (rank + 1) * BATCH)
    x = x_all[rows].clone().requires_grad_()
    loss = head(x, y_all[rows])
    loss.backward()
    grad = head.weight.grad.coalesce()
    return {"loss": loss.detach(), "grad_x": x.grad, "classes": head.last_index + head.shard.start,
            "grad_rows": grad.values(), "grad_index": grad.indices()[0] + head.shard.start}


@pytest.mark.parametrize("world_size", [2, 3])
def test_sampled_sharded_head_equals_reference_over_sampled_classes(world_size: int) -> None:
    results = run_ranks(_sampled_rank, world_size, timeout_s=120)
    generator = torch.Generator().manual_seed(SEED)
    x_all = torch.randn(world_size * BATCH, DIM, generator=generator, dtype=torch.float64)
    y_all = torch.randint(0, NUM_CLASSES, (world_size * BATCH,), generator=generator)
    classes = torch.cat([r["classes"] for r in results])
    assert torch.isin(y_all, classes).all()
    full = init_centres(ClassShard(NUM_CLASSES, 1, 0), DIM, SEED).double()
    w = full[classes].clone().requires_grad_()
    x = x_all.clone().requires_grad_()
    remap = torch.searchsorted(classes, y_all)
    ref = reference_loss("cosface", x, w, remap)
    ref.backward()
    offset = 0
    for rank, r in enumerate(results):
        torch.testing.assert_close(r["loss"], ref.detach(), rtol=1e-11, atol=1e-12)
        torch.testing.assert_close(r["grad_x"], x.grad[rank * BATCH:(rank + 1) * BATCH], rtol=1e-9, atol=1e-13)
        n = r["classes"].numel()
        assert torch.equal(r["grad_index"], r["classes"])
        torch.testing.assert_close(r["grad_rows"], w.grad[offset:offset + n], rtol=1e-9, atol=1e-13)
        offset += n
