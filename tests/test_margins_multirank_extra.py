"""The issue-5 margins (SV/MV, sphereface, circle, curricularface) in PartialFC on 1, 2 and
3 real gloo ranks against the plain dense reference of tests/margin_reference_extra.py.

float64, 1003 classes (uneven shards), chunked and unchunked; CurricularFace over two
steps (its running t); two sampled cases (Partial FC sampling through the global-target
path). One spawn per world size runs every case.
"""

from __future__ import annotations

import pytest
import torch
from margin_reference_extra import extra_reference_loss

from fr_trainer.distributed.shard import ClassShard
from fr_trainer.distributed.spawn import run_ranks
from fr_trainer.heads import PartialFC
from fr_trainer.heads.init import init_centres

NUM_CLASSES, DIM, BATCH, SEED = 1003, 24, 6, 11
CASES = [  # (margin, keywords, chunk_size, sample_rate, steps)
    ("sv_softmax", {}, None, 1.0, 1),
    ("sv_softmax", {"s": 20.0, "t": 1.3}, 97, 1.0, 1),
    ("sv_cosface", {}, None, 1.0, 1),
    ("sv_cosface", {"m": 0.2, "t": 1.5}, 128, 1.0, 1),
    ("sv_arcface", {}, None, 1.0, 1),
    ("sv_arcface", {"m": 2.8}, 251, 1.0, 1),  # the th/mm fall-back decides the mask
    ("sv_arcface", {"easy_margin": True, "gradient": "straight_through"}, None, 1.0, 1),
    ("mv_softmax", {}, None, 1.0, 1),
    ("mv_softmax", {"target": "arcface"}, 300, 1.0, 1),
    ("sphereface", {}, None, 1.0, 1),
    ("sphereface", {"m": 2.5, "s": 30.0}, 97, 1.0, 1),
    ("sphereface", {"m": 3.0, "gradient": "straight_through"}, None, 1.0, 1),
    ("circle", {}, None, 1.0, 1),
    ("circle", {"gamma": 64.0, "m": 0.4}, 97, 1.0, 1),
    ("curricularface", {}, None, 1.0, 2),
    ("curricularface", {"m": 0.3}, 128, 1.0, 2),
    ("sv_cosface", {}, 200, 0.3, 1),
    ("curricularface", {}, None, 0.3, 2),
]


def global_batch(world_size: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch whose odd rows lie near their class centre (cos_y ~ 0.9): both sides of
    every support-vector / hard-example mask are exercised."""
    generator = torch.Generator().manual_seed(SEED + 100 * step)
    x = torch.randn(world_size * BATCH, DIM, generator=generator, dtype=torch.float64)
    y = torch.randint(0, NUM_CLASSES, (world_size * BATCH,), generator=generator)
    y[1] = y[0]  # a repeated class
    y[-1] = NUM_CLASSES - 1  # the last class, on the last (smaller) shard
    centres = torch.nn.functional.normalize(full_weight()[y], dim=1)
    x[1::2] = 0.4 * x[1::2] + 4.0 * centres[1::2]
    return x, y


def full_weight() -> torch.Tensor:
    return init_centres(ClassShard(NUM_CLASSES, 1, 0), DIM, SEED).double()


def _rank_results(rank: int, world_size: int) -> list[list[dict]]:
    rows = slice(rank * BATCH, (rank + 1) * BATCH)
    out = []
    for margin, kw, chunk, rate, steps in CASES:
        head = PartialFC(NUM_CLASSES, DIM, margin=margin, chunk_size=chunk, sample_rate=rate,
                         seed=SEED, **kw).double()
        per_step = []
        for step in range(steps):
            x_all, y_all = global_batch(world_size, step)
            head.zero_grad()
            x = x_all[rows].clone().requires_grad_()
            loss = head(x, y_all[rows])
            loss.backward()
            grad_w = head.weight.grad
            per_step.append({
                "loss": loss.detach(), "grad_x": x.grad,
                "grad_w": grad_w.to_dense() if grad_w.is_sparse else grad_w,
                "sparse": grad_w.is_sparse,
                "index": None if head.last_index is None else head.last_index + head.shard.start,
                "start": head.shard.start, "end": head.shard.end,
                "state": {k: v.clone() for k, v in head.margin.state_dict().items()},
            })
        out.append(per_step)
    return out


def _reference(margin: str, kw: dict, step: int, world_size: int, columns: torch.Tensor | None,
               t_prev: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    x_all, y_all = global_batch(world_size, step)
    x = x_all.clone().requires_grad_()
    w = full_weight().requires_grad_()
    labels, used = y_all, w
    if columns is not None:  # sampled: CE over the union of every rank's sampled centres
        labels, used = torch.searchsorted(columns, y_all), w[columns]
        assert torch.equal(columns[labels], y_all), "a positive centre was not sampled"
    loss, t_new = extra_reference_loss(margin, x, used, labels, kw, t_prev)
    loss.backward()
    return loss.detach(), x.grad, w.grad, t_new


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_extra_margins_sharded_equal_dense_reference(world_size: int) -> None:
    results = run_ranks(_rank_results, world_size, timeout_s=240)
    for case_index, (margin, kw, chunk, rate, steps) in enumerate(CASES):
        t_prev = 0.0
        for step in range(steps):
            per_rank = [r[case_index][step] for r in results]
            columns = None
            if rate < 1.0:
                columns = torch.cat([r["index"] for r in per_rank])
                assert all(r["sparse"] for r in per_rank)
                assert len(columns) < NUM_CLASSES
            ref_loss, ref_gx, ref_gw, t_prev = _reference(margin, kw, step, world_size, columns, t_prev)
            label = f"{margin} {kw} chunk={chunk} rate={rate} step={step} world={world_size}"
            for rank, r in enumerate(per_rank):
                torch.testing.assert_close(r["loss"], ref_loss, rtol=1e-11, atol=1e-11, msg=label)
                rows = slice(rank * BATCH, (rank + 1) * BATCH)
                torch.testing.assert_close(r["grad_x"], ref_gx[rows], rtol=1e-9, atol=1e-12, msg=label)
                torch.testing.assert_close(r["grad_w"], ref_gw[r["start"]:r["end"]], rtol=1e-9,
                                           atol=1e-12, msg=label)
                if margin == "curricularface":
                    t = r["state"]["t"]
                    assert t.dtype == torch.float64 and t.shape == ()
                    assert float(t) == pytest.approx(t_prev, rel=1e-12, abs=1e-15), label
                    assert torch.equal(t, per_rank[0]["state"]["t"]), f"t differs across ranks: {label}"
            if margin == "curricularface":
                assert t_prev != 0.0
