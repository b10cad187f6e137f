"""Verification on the `.bin` sets during training, embedded by all ranks (sharded).

Each rank embeds its contiguous block of every set (`embed_shard`), the blocks are
all-gathered, and the (cheap) 10-fold evaluation runs on the gathered embeddings.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from fr_trainer.eval.binset import BinSet, load_bin
from fr_trainer.eval.verification import embed_shard, evaluate_embeddings


def find_bins(root: str | Path, patterns: list[str]) -> list[Path]:
    """`.bin` files of `root` whose stem matches any pattern (e.g. "*", "lfw")."""
    root = Path(root)
    found = sorted(root.glob("*.bin"))
    return [
        p for p in found if any(fnmatch.fnmatch(p.stem, pat) or p.name == pat for pat in patterns)
    ]


class _ModuleEmbedder:
    def __init__(self, module: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
        self.module, self.device, self.dtype = module, device, dtype

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device, self.dtype)
            return self.module(x).float().cpu().numpy()


class PeriodicVerifier:
    def __init__(self, paths: list[Path], batch_size: int, rank: int, world_size: int) -> None:
        self.sets: list[BinSet] = [load_bin(p, num_workers=2) for p in paths]
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size

    def __bool__(self) -> bool:
        return bool(self.sets)

    def run(self, backbone: nn.Module, device: torch.device, dtype: torch.dtype) -> dict[str, dict]:
        """Collective. {set name: evaluate(...) result} on every rank."""
        was_training = backbone.training
        backbone.eval()
        embedder = _ModuleEmbedder(backbone, device, dtype)
        results = {}
        try:
            for binset in self.sets:
                part = embed_shard(
                    embedder, binset.images, self.rank, self.world_size, self.batch_size
                )
                if self.world_size > 1:
                    parts: list = [None] * self.world_size
                    dist.all_gather_object(parts, part)
                    part = np.concatenate(parts)
                results[binset.name] = evaluate_embeddings(part, binset.issame)
        finally:
            backbone.train(was_training)
        return results
