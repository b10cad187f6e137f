"""Verification on the `.bin` sets during training, embedded by all ranks (sharded).

Each rank embeds its contiguous block of every set (`embed_shard`), the blocks are
all-gathered, and the (cheap) 10-fold evaluation runs on the gathered embeddings.

Only the sets that `eval.bins` names are loaded (a `.bin` is a pickle: files nobody listed
are never opened); each is read with the restricted unpickler of `fr_trainer.eval.binset`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from fr_trainer.eval.binset import BinSet, load_bin
from fr_trainer.eval.verification import embed_shard, evaluate_embeddings
from fr_trainer.train.config import ConfigError

_PATTERN_CHARS = set("*?[]")


def _available(root: Path) -> str:
    names = sorted(p.stem for p in root.glob("*.bin")) if root.is_dir() else []
    return ", ".join(names[:20]) or "none"


def find_bins(root: str | Path, names: list[str]) -> list[Path]:
    """`root/<name>.bin` for each name of eval.bins (e.g. "lfw" or "lfw.bin"); no patterns.

    Raises ConfigError naming eval.bins and the file when a name is a pattern, a path, or
    names a file that does not exist.
    """
    root = Path(root)
    paths = []
    for name in names:
        if not name or _PATTERN_CHARS & set(name) or "/" in name or "\\" in name:
            raise ConfigError(
                f"eval.bins entry {name!r} is not a set name: list the .bin sets of data.root by "
                f"name, e.g. eval.bins=[\"lfw\", \"cfp_fp\"] (in {root}: {_available(root)})"
            )
        path = root / (name if name.endswith(".bin") else f"{name}.bin")
        if not path.is_file():
            raise ConfigError(
                f"eval.bins names {name!r} but {path} does not exist (the .bin sets in {root}: "
                f"{_available(root)}); fix the name or remove it from eval.bins"
            )
        paths.append(path)
    return paths


def load_named_bin(path: Path) -> BinSet:
    """`load_bin`, with its errors (unreadable, crafted, wrong structure) as a ConfigError."""
    try:
        return load_bin(path, num_workers=2)
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(
            f"eval.bins: {error}; replace the file or remove {path.stem!r} from eval.bins"
        ) from None


class _ModuleEmbedder:
    def __init__(self, module: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
        self.module, self.device, self.dtype = module, device, dtype

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device, self.dtype)
            return self.module(x).float().cpu().numpy()


class PeriodicVerifier:
    def __init__(self, paths: list[Path], batch_size: int, rank: int, world_size: int) -> None:
        self.sets: list[BinSet] = [load_named_bin(p) for p in paths]
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
