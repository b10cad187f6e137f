"""Regularizers (CenterLoss, CirclePairLoss, TripletLoss) on 1, 2 and 3 real gloo ranks
against naive loops over the whole global batch (float64). World size 1 runs in-process;
each larger world size is one spawn running every case."""

from __future__ import annotations

import pytest
import torch
from margin_reference_extra import naive_center, naive_center_update, naive_circle, naive_triplet

from fr_trainer.distributed.spawn import run_ranks
from fr_trainer.regularizers import CenterLoss, CirclePairLoss, TripletLoss

NUM_CLASSES, DIM, BATCH = 11, 6, 6
CASES = [  # (kind, keywords)
    ("center", {"update": "sgd", "loss_weight": 0.5}),
    ("center", {"update": "paper", "alpha": 0.5}),
    ("circle", {}),
    ("circle", {"gamma": 256.0, "m": 0.25}),
    ("triplet", {"mining": "batch_hard"}),
    ("triplet", {"mining": "semi_hard", "margin": 0.5}),
    ("triplet", {"mining": "semi_hard", "normalize": False, "margin": 2.0}),
]


def global_batch(world_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Embeddings [G, D], labels [G] (repeats, singletons, an uneven class count) and
    full centres [K, D]."""
    generator = torch.Generator().manual_seed(7 + world_size)
    g = world_size * BATCH
    y = torch.randint(0, 4 + world_size, (g,), generator=generator)
    y[-1] = NUM_CLASSES - 1  # a singleton: no positive, on the last shard
    centres = torch.randn(NUM_CLASSES, DIM, generator=generator, dtype=torch.float64)
    x = centres[y] * 0.7 + torch.randn(g, DIM, generator=generator, dtype=torch.float64)
    return x, y, torch.randn(NUM_CLASSES, DIM, generator=generator, dtype=torch.float64)


def build(kind: str, kw: dict):
    if kind == "center":
        return CenterLoss(NUM_CLASSES, DIM, **kw).double()
    return CirclePairLoss(**kw) if kind == "circle" else TripletLoss(**kw)


def _rank_results(rank: int, world_size: int) -> list[dict]:
    x_all, y_all, centres = global_batch(world_size)
    rows = slice(rank * BATCH, (rank + 1) * BATCH)
    out = []
    for kind, kw in CASES:
        loss_fn = build(kind, kw)
        if kind == "center":
            with torch.no_grad():
                loss_fn.centres.copy_(centres[loss_fn.shard.start:loss_fn.shard.end])
        x = x_all[rows].clone().requires_grad_()
        loss = loss_fn(x, y_all[rows])
        loss.backward()
        result = {"loss": loss.detach(), "grad_x": x.grad}
        if kind == "center":
            result.update(start=loss_fn.shard.start, end=loss_fn.shard.end,
                          centres=loss_fn.centres.detach().clone(),
                          grad_c=None if loss_fn.centres.grad is None else loss_fn.centres.grad.clone())
        out.append(result)
    return out


def _reference(kind: str, kw: dict, x_all, y_all, centres):
    x = x_all.clone().requires_grad_()
    c = centres.clone().requires_grad_()
    if kind == "center":
        loss = naive_center(x, y_all, c, kw.get("loss_weight", 0.003))
    elif kind == "circle":
        loss = naive_circle(x, y_all, kw.get("gamma", 80.0), kw.get("m", 0.4))
    else:
        loss = naive_triplet(x, y_all, kw.get("margin", 0.2), kw["mining"], kw.get("normalize", True))
    loss.backward()
    return loss.detach(), x.grad, c.grad


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_regularizers_sharded_equal_naive_loops(world_size: int) -> None:
    if world_size == 1:
        results = [_rank_results(0, 1)]
    else:
        results = run_ranks(_rank_results, world_size, timeout_s=180)
    x_all, y_all, centres = global_batch(world_size)
    for case_index, (kind, kw) in enumerate(CASES):
        ref_loss, ref_gx, ref_gc = _reference(kind, kw, x_all, y_all, centres)
        assert ref_loss > 0
        label = f"{kind} {kw} world={world_size}"
        for rank, per_case in enumerate(results):
            r = per_case[case_index]
            torch.testing.assert_close(r["loss"], ref_loss, rtol=1e-11, atol=1e-13, msg=label)
            rows = slice(rank * BATCH, (rank + 1) * BATCH)
            torch.testing.assert_close(r["grad_x"], ref_gx[rows], rtol=1e-9, atol=1e-13, msg=label)
            if kind != "center":
                continue
            own = slice(r["start"], r["end"])
            if kw["update"] == "sgd":
                torch.testing.assert_close(r["grad_c"], ref_gc[own], rtol=1e-9, atol=1e-13, msg=label)
                torch.testing.assert_close(r["centres"], centres[own], rtol=0, atol=0, msg=label)
            else:
                assert r["grad_c"] is None
                moved = naive_center_update(x_all, y_all, centres, kw["alpha"])
                torch.testing.assert_close(r["centres"], moved[own], rtol=1e-12, atol=1e-14, msg=label)
                assert not torch.equal(moved[own], centres[own]) or r["end"] - r["start"] == 0
        if kind == "center":
            assert max(p[case_index]["end"] for p in results) == NUM_CLASSES
