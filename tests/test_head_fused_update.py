"""The fused head update (`PartialFC.update_in_backward` with the optimizers' `update_rows`):
the centres stepped a chunk at a time inside the backward equal, bit for bit, the centres
of an unfused head stepped by `optimizer.step()` after it, for SGD and AdamW, in fp32 and
16-bit compute, linear and non-linear margins, at world sizes 1, 2 and 3 with an uneven
number of classes, chunked or not, in one piece or several; the whole centre gradient is never
held; misuse is refused by name."""

from __future__ import annotations

import pytest
import torch

from fr_trainer.distributed.spawn import run_ranks
from fr_trainer.heads import PartialFC
from fr_trainer.heads.device_policy import CPU_BLOCK_ELEMENTS, BlockPolicy
from fr_trainer.train.optim import SGD, AdamW

NUM_CLASSES, DIM, BATCH, CHUNK = 1003, 32, 8, 150
# pieces of 64 classes, cut from 16-bit GEMM chunks of 32: several pieces per block
SMALL_PIECES = BlockPolicy("cpu", CPU_BLOCK_ELEMENTS, 32, reuse_buffers=True, piece_rows=64)
CASES = [  # (margin, compute dtype, optimizer, chunk_size, block policy)
    ("arcface", None, "sgd", CHUNK, None),
    ("arcface", torch.bfloat16, "sgd", CHUNK, None),
    ("cosface", torch.float16, "adamw", CHUNK, None),
    ("sv_arcface", None, "adamw", CHUNK, None),
    ("sv_arcface", torch.bfloat16, "sgd", CHUNK, None),
    ("softmax", None, "sgd", CHUNK, None),  # (a bias: stepped by the optimizer, not in the backward)
    ("arcface", torch.bfloat16, "sgd", None, SMALL_PIECES),  # unchunked: the pieces bound the buffer
    ("cosface", torch.float16, "sgd", None, SMALL_PIECES),
    ("sv_arcface", None, "adamw", None, SMALL_PIECES),
    ("arcface", None, "sgd", CHUNK, SMALL_PIECES),  # chunked, several pieces per chunk
    ("arcface", torch.bfloat16, "adamw", None, "cuda"),  # whole-buffer passes, one piece per block
]


def _optimizer(kind: str, params) -> torch.optim.Optimizer:
    if kind == "sgd":
        return SGD(params, lr=0.2, momentum=0.9, weight_decay=5e-4, nesterov=True)
    return AdamW(params, lr=1e-2, weight_decay=0.05)


def _steps(rank: int, world_size: int, margin: str, dtype, kind: str, chunk, policy, fused: bool) -> dict:
    """Three steps of a head on this rank's rows of a fixed global batch; the final state."""
    head = PartialFC(NUM_CLASSES, DIM, margin=margin, chunk_size=chunk, seed=5, compute_dtype=dtype,
                     block_policy=policy)
    optimizer = _optimizer(kind, list(head.parameters()))
    most = []
    if fused:
        def update(start: int, end: int, grad_rows: torch.Tensor) -> None:
            most.append(grad_rows.shape[0])
            optimizer.update_rows(head.weight, start, end, grad_rows)

        head.update_in_backward(update)
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(world_size * BATCH, DIM, generator=generator)[rank * BATCH:(rank + 1) * BATCH]
        y = torch.randint(0, NUM_CLASSES, (world_size * BATCH,), generator=generator)[rank * BATCH:(rank + 1) * BATCH]
        loss = head(x.requires_grad_(), y)
        loss.backward()
        assert (head.weight.grad is None) == fused
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    state = optimizer.state[head.weight]
    return {"weight": head.weight.detach().clone(), "state": {k: v.clone() for k, v in state.items()},
            "bias": None if head.bias is None else head.bias.detach().clone(), "grad_x": x.grad,
            "largest_rows": max(most, default=0)}


def _fused_and_plain(rank: int, world_size: int) -> list[tuple[dict, dict]]:
    return [(_steps(rank, world_size, *case, fused=True), _steps(rank, world_size, *case, fused=False))
            for case in CASES]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_the_fused_update_equals_the_unfused_step_bit_for_bit(world_size: int) -> None:
    for rank, results in enumerate(run_ranks(_fused_and_plain, world_size)):
        for (margin, dtype, kind, chunk, policy), (fused, plain) in zip(CASES, results):
            case = f"{margin} {dtype} {kind} chunk {chunk} {getattr(policy, 'piece_rows', policy)} at rank {rank}"
            pieces = min(CHUNK if chunk else NUM_CLASSES, getattr(policy, "piece_rows", NUM_CLASSES))
            assert torch.equal(fused["weight"], plain["weight"]), case
            assert fused["state"].keys() == plain["state"].keys(), case
            assert all(torch.equal(fused["state"][k], plain["state"][k]) for k in plain["state"]), case
            assert (fused["bias"] is None) or torch.equal(fused["bias"], plain["bias"]), case
            assert torch.equal(fused["grad_x"], plain["grad_x"]), case
            assert 0 < fused["largest_rows"] <= pieces, case  # (a piece, not the whole shard, at once)


def test_the_fused_update_is_refused_where_it_cannot_hold() -> None:
    def noop(start, end, rows):
        return None

    with pytest.raises(ValueError, match="needs sample_rate=1.0"):
        PartialFC(100, 8, sample_rate=0.5, chunk_size=10).update_in_backward(noop)
    with pytest.raises(ValueError, match="sub-centres"):
        PartialFC(100, 8, margin="subcenter_arcface").update_in_backward(noop)
    head = PartialFC(100, 8, chunk_size=10)
    head.update_in_backward(noop)
    head.update_in_backward(None)  # (off again: the gradient is whole)
    head(torch.randn(4, 8), torch.arange(4)).backward()
    assert head.weight.grad is not None and head.weight.grad.shape == (100, 8)
    with pytest.raises(ValueError, match="not in this optimizer"):
        SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1).update_rows(head.weight, 0, 1, torch.zeros(1, 8))
