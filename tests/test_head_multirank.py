"""PartialFC on 1, 2 and 3 real gloo ranks against a plain dense single-process reference.

float64 throughout; an uneven class count (1003) so shards differ in size.
"""

from __future__ import annotations

import time

import pytest
import torch
from head_reference import reference_loss

from fr_trainer.distributed.shard import ClassShard
from fr_trainer.distributed.spawn import RankFailed, run_ranks
from fr_trainer.heads import PartialFC
from fr_trainer.heads.init import init_centres

NUM_CLASSES, DIM, BATCH, SEED = 1003, 24, 6, 11
CASES = [  # (margin, keywords, chunk_size)
    ("softmax", {}, None),
    ("normface", {}, None),
    ("coco", {}, 300),
    ("cosface", {}, None),
    ("cosface", {"s": 30.0, "m": 0.4}, 97),
    ("arcface", {}, None),
    ("arcface", {}, 128),
    ("arcface", {"easy_margin": True}, None),
    ("arcface", {"m": 2.8}, None),  # theta + m > pi for most rows: the th/mm fall-back
    ("combined", {}, None),
    ("combined", {"m1": 0.9, "m2": 0.4, "m3": 0.15}, 251),
]


def global_batch(world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(SEED)
    x = torch.randn(world_size * BATCH, DIM, generator=generator, dtype=torch.float64)
    y = torch.randint(0, NUM_CLASSES, (world_size * BATCH,), generator=generator)
    y[1] = y[0]  # a repeated class in the batch
    y[-1] = NUM_CLASSES - 1  # the last class (on the last, smaller shard)
    return x, y


def _rank_losses(rank: int, world_size: int) -> list[dict]:
    x_all, y_all = global_batch(world_size)
    rows = slice(rank * BATCH, (rank + 1) * BATCH)
    out = []
    for margin, kw, chunk in CASES:
        head = PartialFC(NUM_CLASSES, DIM, margin=margin, chunk_size=chunk, seed=SEED, **kw).double()
        if head.bias is not None:
            biases = torch.linspace(-0.5, 0.5, NUM_CLASSES, dtype=torch.float64)
            with torch.no_grad():
                head.bias.copy_(biases[head.shard.start:head.shard.end])
        x = x_all[rows].clone().requires_grad_()
        loss = head(x, y_all[rows])
        loss.backward()
        out.append({
            "loss": loss.detach(), "grad_x": x.grad, "grad_w": head.weight.grad,
            "grad_b": None if head.bias is None else head.bias.grad,
            "start": head.shard.start, "end": head.shard.end,
        })
    return out


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_sharded_head_equals_dense_reference(world_size: int) -> None:
    results = run_ranks(_rank_losses, world_size, timeout_s=240)
    x_all, y_all = global_batch(world_size)
    full_weight = init_centres(ClassShard(NUM_CLASSES, 1, 0), DIM, SEED).double()
    for case_index, (margin, kw, chunk) in enumerate(CASES):
        per_rank = [r[case_index] for r in results]
        x = x_all.clone().requires_grad_()
        w = full_weight.clone().requires_grad_()
        b = torch.linspace(-0.5, 0.5, NUM_CLASSES, dtype=torch.float64).requires_grad_()
        ref = reference_loss(margin, x, w, y_all, kw, bias=b)
        ref.backward()
        label = f"{margin} {kw} chunk={chunk} world={world_size}"
        for rank, r in enumerate(per_rank):
            torch.testing.assert_close(r["loss"], ref.detach(), rtol=1e-11, atol=1e-11, msg=label)
            rows = slice(rank * BATCH, (rank + 1) * BATCH)
            torch.testing.assert_close(r["grad_x"], x.grad[rows], rtol=1e-9, atol=1e-12, msg=label)
            torch.testing.assert_close(r["grad_w"], w.grad[r["start"]:r["end"]], rtol=1e-9, atol=1e-12, msg=label)
            if r["grad_b"] is not None:
                torch.testing.assert_close(r["grad_b"], b.grad[r["start"]:r["end"]], rtol=1e-9, atol=1e-12, msg=label)
        assert sorted((r["start"], r["end"]) for r in per_rank)[-1][1] == NUM_CLASSES


def test_initial_centres_do_not_depend_on_world_size() -> None:
    full = init_centres(ClassShard(NUM_CLASSES, 1, 0), DIM, SEED)
    for world_size in (2, 3, 5):
        shards = [init_centres(ClassShard(NUM_CLASSES, world_size, r), DIM, SEED) for r in range(world_size)]
        assert torch.equal(torch.cat(shards), full)
        assert not torch.equal(shards[0][:10], shards[1][:10])  # shards differ across ranks
    assert not torch.equal(init_centres(ClassShard(NUM_CLASSES, 1, 0), DIM, SEED + 1), full)


def test_initial_centres_do_not_depend_on_the_number_of_drawing_threads() -> None:
    from fr_trainer.heads.init import INIT_BLOCK

    classes = 3 * INIT_BLOCK + 17  # shards that start and end inside blocks
    for world_size, rank in ((1, 0), (3, 1)):
        shard = ClassShard(classes, world_size, rank)
        serial = init_centres(shard, 8, SEED, threads=1)
        assert torch.equal(init_centres(shard, 8, SEED, threads=3), serial)
        assert torch.equal(init_centres(shard, 8, SEED, threads=16), serial)  # more threads than blocks


def _bad_label_on_rank_one(rank: int, world_size: int) -> None:
    head = PartialFC(NUM_CLASSES, DIM, margin="arcface", seed=SEED)
    labels = torch.zeros(BATCH, dtype=torch.int64)
    if rank == 1:
        labels[2] = NUM_CLASSES + 5
    head(torch.randn(BATCH, DIM), labels)


@pytest.mark.parametrize("world_size", [2, 3])
def test_out_of_range_label_on_one_rank_raises_on_every_rank(world_size: int) -> None:
    started = time.monotonic()
    with pytest.raises(RankFailed) as failure:
        run_ranks(_bad_label_on_rank_one, world_size, timeout_s=60)
    assert time.monotonic() - started < 60
    errors = failure.value.errors
    assert sorted(errors) == list(range(world_size)), errors
    for text in errors.values():
        assert "ValueError" in text and f"rank 1 has 1 label(s) outside [0, {NUM_CLASSES}): [{NUM_CLASSES + 5}]" in text


def _uneven_batches(rank: int, world_size: int) -> None:
    head = PartialFC(NUM_CLASSES, DIM, seed=SEED)
    batch = BATCH + rank
    head(torch.randn(batch, DIM), torch.zeros(batch, dtype=torch.int64))


def test_different_batch_sizes_raise_on_every_rank() -> None:
    with pytest.raises(RankFailed) as failure:
        run_ranks(_uneven_batches, 2, timeout_s=60)
    assert sorted(failure.value.errors) == [0, 1]
    assert all("same batch size" in text for text in failure.value.errors.values())
