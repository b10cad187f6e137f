"""PartialFC(compiled=True) (elementwise passes fused by torch.compile, fr_trainer/heads/fused.py)
gives the eager head's loss and gradients, in fp32 and bf16, for a margin with linear
non-target logits (arcface) and one without (sv_arcface), whole and chunked, on 1 process;
on 2 real gloo ranks two of those cases that between them take both margins, both dtypes
and both layouts (each case compiles anew: the matrix again would cost half a minute of the
suite): equal to 1e-5 of each tensor's largest entry. Slow: the compile (a minute on 2 busy
cores, less with inductor's cache warm)."""

from __future__ import annotations

import pytest
import torch

from fr_trainer.distributed.spawn import run_ranks
from fr_trainer.heads import PartialFC

NUM_CLASSES, DIM, BATCH, SEED = 1003, 32, 6, 7
DTYPES = {"fp32": None, "bf16": torch.bfloat16}
CASES = [(margin, dtype, chunk) for margin in ("arcface", "sv_arcface") for dtype in DTYPES for chunk in (None, 300)]
SHARDED_CASES = [("arcface", "fp32", None), ("sv_arcface", "bf16", 300)]


def _cases(world_size: int) -> list[tuple[str, str, int | None]]:
    return CASES if world_size == 1 else SHARDED_CASES


def _results(rank: int, world_size: int, compiled: bool) -> list[tuple[torch.Tensor, ...]]:
    generator = torch.Generator().manual_seed(SEED)
    x_all = torch.randn(world_size * BATCH, DIM, generator=generator)
    y_all = torch.randint(0, NUM_CLASSES, (world_size * BATCH,), generator=generator)
    rows = slice(rank * BATCH, (rank + 1) * BATCH)
    out = []
    for margin, dtype, chunk in _cases(world_size):
        head = PartialFC(NUM_CLASSES, DIM, margin=margin, chunk_size=chunk, seed=SEED,
                         compute_dtype=DTYPES[dtype], compiled=compiled)
        x = x_all[rows].clone().requires_grad_()
        loss = head(x, y_all[rows])
        loss.backward()
        out.append((loss.detach(), x.grad, head.weight.grad))
    return out


def _both(rank: int, world_size: int) -> tuple[list, list]:
    # the compiled passes fuse the eager passes over a logit buffer; eager bf16 arcface would
    # take the bf16 exponentials instead (no such passes in its backward; compared with the
    # buffer path in test_head_mixed_precision), so the eager side here runs the buffer path
    from fr_trainer.heads import margin_softmax

    margin_softmax.uses_bf16_cosines = lambda *args: False  # (this rank's own process)
    return _results(rank, world_size, False), _results(rank, world_size, True)


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [1, 2])
def test_compiled_head_equals_eager_head(world_size: int) -> None:
    per_rank = run_ranks(_both, world_size, timeout_s=600)
    for rank, (eager, compiled) in enumerate(per_rank):
        assert len(eager) == len(compiled) == len(_cases(world_size))
        for (margin, dtype, chunk), a, b in zip(_cases(world_size), eager, compiled):
            label = f"{margin} {dtype} chunk={chunk} world={world_size} rank={rank}"
            # fused loops sum in another order; in bf16 an fp32 probability one ulp apart may
            # round to the other bf16 neighbour: a few 1e-6 of the largest entry either way
            for u, v in zip(a, b):
                assert float((v - u).abs().max()) <= 1e-5 * float(u.abs().max()), label
