"""Initialisation of sharded class centres that does not depend on the world size.

Centres are drawn in fixed blocks of classes, each block from its own generator seeded
by (seed, block). A rank draws only the blocks its shard overlaps, so shards differ across
ranks, a run is reproducible for a seed, and the same seed gives the same full matrix at
any world size and on any device (which keeps resharded runs and single-process references
comparable). The blocks are drawn on the host, by up to `torch.get_num_threads()` threads at
once (a block's numbers depend only on its own generator, so not on the threads), and copied
to the device: a 10M-class shard (5e9 numbers) takes ~30 s on one core.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

from fr_trainer.distributed.shard import ClassShard

INIT_BLOCK = 4096
_MASK_63 = (1 << 63) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def block_seed(seed: int, block: int) -> int:
    return ((seed & _MASK_63) * _GOLDEN + block * 0xBF58476D1CE4E5B9 + 1) & _MASK_63


def init_centres(shard: ClassShard, embedding_size: int, seed: int, std: float = 0.01,
                 dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, threads: int | None = None) -> torch.Tensor:
    """This shard's rows [num_local, D] of a N(0, std^2) centre matrix fixed by `seed`,
    allocated on `device` (default: the CPU).

    Each block is drawn on the host by a CPU generator (the same numbers on any device)
    and copied into place, so the host holds one block per thread at a time, never the
    shard (at 10M classes per GPU the shard is tens of GB). `threads` (default
    `torch.get_num_threads()`, which torchrun sets to 1 per worker) draw blocks at once."""
    out = torch.empty(shard.num_local, embedding_size, dtype=dtype, device=device)
    first, last = shard.start // INIT_BLOCK, (shard.end - 1) // INIT_BLOCK

    def fill(block: int) -> None:
        generator = torch.Generator().manual_seed(block_seed(seed, block))
        lo = max(shard.start, block * INIT_BLOCK)
        hi = min(shard.end, (block + 1) * INIT_BLOCK)
        rows = torch.empty(INIT_BLOCK, embedding_size, dtype=dtype).normal_(0.0, std, generator=generator)
        out[lo - shard.start : hi - shard.start].copy_(rows[lo - block * INIT_BLOCK : hi - block * INIT_BLOCK])

    blocks = range(first, last + 1)
    workers = min(len(blocks), max(1, torch.get_num_threads() if threads is None else threads))
    if workers == 1:
        for block in blocks:
            fill(block)
        return out
    with ThreadPoolExecutor(workers, thread_name_prefix="init_centres") as pool:
        list(pool.map(fill, blocks))  # (list: raises the first error of a block)
    return out
