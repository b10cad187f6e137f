"""How the head cuts its elementwise passes and 16-bit GEMM temporaries, per device.

The margin-softmax head makes a few elementwise passes over its [G, C_local] logit buffer
(`fr_trainer.heads.margin_softmax`). On a CPU each pass runs over row blocks of about 1 MB
(`CPU_BLOCK_ELEMENTS`), so the buffer is streamed through the cache once per pass instead
of once per operation; the 16-bit GEMMs that feed an fp32 buffer run in column chunks of
`CPU_MM_COLUMNS` classes to bound their temporary. Both multiply the number of ops by a
factor that grows with C_local - cheap on a CPU, where an op costs nanoseconds to launch,
but on a GPU every op is a kernel launch (microseconds) and blocking buys nothing (there is
no cache of that size to stay in). So on CUDA each pass is one op over the whole buffer and
the GEMMs run in one piece: the number of ops per step does not depend on the number of
classes. The memory knob there is the head's `chunk_size` (a fixed number of ops per chunk).

On a CPU the policy also reuses the head's big temporaries from step to step
(`fr_trainer.heads.buffer_pool`: fresh pages cost a fault and a zeroing each); CUDA's
caching allocator does that already.

`policy_for(device)` picks the policy; `FR_HEAD_BLOCK_POLICY=cpu|cuda` (environment),
`forced_policy("cuda")` (context manager) and `PartialFC(block_policy=...)` override it, in
that order of increasing precedence, so that a CPU test can run the CUDA policy.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

CPU_BLOCK_ELEMENTS = 1 << 18  # elements per row block of an elementwise pass (~1 MB fp32)
CPU_MM_COLUMNS = 1 << 12  # classes per 16-bit GEMM whose result is converted: its temporary
# ([4096, 512] bf16 = 4 MB for the centres' gradient) is still in cache when it is widened
ENV_VAR = "FR_HEAD_BLOCK_POLICY"
# classes per piece of the centres' gradient handed to a fused update (`PartialFC.update_in_backward`):
# CPU, four 16-bit GEMM chunks (pieces stay aligned with them); CUDA, 2^16 rows (128 MB at D 512)
CPU_PIECE_ROWS, CUDA_PIECE_ROWS = 4 * CPU_MM_COLUMNS, 1 << 16


@dataclass(frozen=True)
class BlockPolicy:
    """`row_block_elements`: elements per row block of a pass (None: the whole buffer in one
    op); `mm_columns`: classes per 16-bit GEMM chunk (None: one GEMM); `piece_rows`: classes
    per piece of the centres' gradient under a fused update."""

    name: str
    row_block_elements: int | None
    mm_columns: int | None
    reuse_buffers: bool = False  # take the big temporaries from `fr_trainer.heads.buffer_pool`
    piece_rows: int = CUDA_PIECE_ROWS

    def row_blocks(self, num_rows: int, num_cols: int) -> list[tuple[int, int]]:
        """[start, end) row ranges covering `num_rows` rows of `num_cols` columns."""
        if self.row_block_elements is None:
            return [(0, num_rows)]
        step = max(1, self.row_block_elements // max(1, num_cols))
        return [(start, min(start + step, num_rows)) for start in range(0, num_rows, step)]

    def pieces(self, start: int, end: int) -> list[tuple[int, int]]:
        """[a, b) ranges of at most `piece_rows` covering [start, end), cut at multiples of
        `piece_rows` from `start` (so that 16-bit GEMM chunks never straddle two pieces)."""
        return [(a, min(a + self.piece_rows, end)) for a in range(start, max(end, start + 1), self.piece_rows)]

    def mm_blocks(self, num_cols: int) -> list[tuple[int, int]]:
        """[start, end) column ranges of the 16-bit GEMM chunks over `num_cols` classes."""
        step = num_cols if self.mm_columns is None else max(1, self.mm_columns)
        return [(start, min(start + step, num_cols)) for start in range(0, max(num_cols, 1), step)]


CPU = BlockPolicy("cpu", CPU_BLOCK_ELEMENTS, CPU_MM_COLUMNS, reuse_buffers=True, piece_rows=CPU_PIECE_ROWS)
CUDA = BlockPolicy("cuda", None, None)
POLICIES = {"cpu": CPU, "cuda": CUDA}

_forced: list[BlockPolicy] = []


def resolve_policy(policy: str | BlockPolicy) -> BlockPolicy:
    """A `BlockPolicy` from itself or its name."""
    if isinstance(policy, BlockPolicy):
        return policy
    if policy not in POLICIES:
        raise ValueError(f"block policy {policy!r} is not one of {', '.join(POLICIES)}; "
                         f"use 'cpu' (cache-sized blocks) or 'cuda' (whole-buffer passes)")
    return POLICIES[policy]


@contextlib.contextmanager
def forced_policy(policy: str | BlockPolicy) -> Iterator[BlockPolicy]:
    """Within the block, heads without their own `block_policy` use `policy`."""
    _forced.append(resolve_policy(policy))
    try:
        yield _forced[-1]
    finally:
        _forced.pop()


def policy_for(device: torch.device | str, override: str | BlockPolicy | None = None) -> BlockPolicy:
    """The policy for tensors on `device`: `override`, else a `forced_policy`, else
    $FR_HEAD_BLOCK_POLICY, else CPU blocks on the CPU and whole-buffer passes elsewhere."""
    if override is not None:
        return resolve_policy(override)
    if _forced:
        return _forced[-1]
    env = os.environ.get(ENV_VAR)
    if env:
        return resolve_policy(env)
    return CPU if torch.device(device).type == "cpu" else CUDA
