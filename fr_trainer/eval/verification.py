"""LFW-style verification: the 10-fold protocol on `.bin` pairs, plus TAR at FAR.

Protocol (FORMATS.md): embed each image and its flip, add, L2-normalise; distance is
squared L2; 10 contiguous folds; per fold the threshold maximising accuracy on the
other nine is applied to the held-out fold. Reported: mean and std (population, as
numpy's default) of the fold accuracies, the per-fold thresholds, and TAR at FAR over
all pairs (score = cosine similarity; convention "max" unless asked otherwise).

During training, every rank embeds `images[shard_slice(len(images), rank, world)]`
with `embed_images`, the trainer all-gathers the features in rank order, and
`evaluate_embeddings` runs on the gathered [2N, D] array (on every rank or on rank 0).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from fr_trainer.eval.binset import BinSet, load_bin
from fr_trainer.eval.embedder import embed_images, shard_slice
from fr_trainer.eval.metrics import FarMode, kfold_accuracy, tar_at_far
from fr_trainer.eval.resolution import resolution_fields

VERIFICATION_FARS: tuple[float, ...] = (1e-3, 1e-4)

__all__ = [
    "VERIFICATION_FARS",
    "embed_images",
    "embed_shard",
    "evaluate",
    "evaluate_embeddings",
    "l2_normalize",
    "shard_slice",
    "verify_bin",
    "verify_binset",
]


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows of x [N, D] divided by their L2 norm (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)


def evaluate(
    emb1: np.ndarray,
    emb2: np.ndarray,
    issame: np.ndarray,
    nfolds: int = 10,
    fars: Iterable[float] = VERIFICATION_FARS,
    far_mode: FarMode = "max",
    threshold_grid: Sequence[float] | None = None,
) -> dict:
    """The k-fold verification protocol on embedded pairs.

    Args:
        emb1, emb2: [N, D] features of the two images of each pair (normalised here).
        issame: [N] bool.
        nfolds: number of contiguous folds (10 in the protocol).
        fars: false-accept rates for TAR@FAR over all N pairs.
        far_mode: "max" (largest TAR with FAR <= f) or "nearest" (insightface).
        threshold_grid: None for the exact threshold search, or candidate thresholds
            (insightface: `np.arange(0, 4, 0.01)`).
    Returns:
        {"accuracy": mean, "accuracy_std": std, "thresholds": [nfolds],
         "fold_accuracies": [nfolds], "tar_at_far": {far: tar}, "far_mode": str,
         "num_pairs": N, "far_resolvable": {far: bool}, "num_impostors": M,
         "smallest_resolvable_far": 1 / M} (fr_trainer.eval.resolution)
    """
    emb1 = np.asarray(emb1)
    emb2 = np.asarray(emb2)
    issame = np.asarray(issame, dtype=bool).reshape(-1)
    if emb1.ndim != 2 or emb1.shape != emb2.shape or emb1.shape[0] != issame.size:
        raise ValueError(
            f"expected emb1 and emb2 of shape [N, D] and issame [N]; got {emb1.shape}, "
            f"{emb2.shape} and {issame.shape}"
        )
    a = l2_normalize(emb1)
    b = l2_normalize(emb2)
    distances = ((a - b) ** 2).sum(axis=1)
    accuracies, thresholds = kfold_accuracy(distances, issame, nfolds, threshold_grid)
    cosine = (a * b).sum(axis=1)
    fars = tuple(fars)
    return {
        "accuracy": float(accuracies.mean()),
        "accuracy_std": float(accuracies.std()),
        "thresholds": [float(t) for t in thresholds],
        "fold_accuracies": [float(x) for x in accuracies],
        "tar_at_far": tar_at_far(cosine, issame, fars, far_mode),
        "far_mode": far_mode,
        "num_pairs": int(issame.size),
        **resolution_fields(fars, int((~issame).sum())),
    }


def embed_shard(
    embedder: Callable[[np.ndarray], np.ndarray],
    images: np.ndarray,
    rank: int,
    world_size: int,
    batch_size: int = 128,
    flip: bool = True,
) -> np.ndarray:
    """This rank's part of the embeddings of a whole set, for verification in training.

    Args:
        images: uint8 [2N, H, W, 3], the whole set (every rank holds it).
    Returns:
        float32 [n_rank, D] for `images[shard_slice(len(images), rank, world_size)]`;
        blocks of ranks 0..world_size-1 concatenated in order give the whole [2N, D]
        (block sizes differ by at most one: pad before an all_gather, then trim).
    """
    return embed_images(
        embedder, images[shard_slice(len(images), rank, world_size)], batch_size, flip
    )


def evaluate_embeddings(embeddings: np.ndarray, issame: np.ndarray, **kwargs) -> dict:
    """`evaluate` on the embeddings of a whole set: [2N, D], pair i = rows 2i, 2i+1."""
    embeddings = np.asarray(embeddings)
    issame = np.asarray(issame, dtype=bool).reshape(-1)
    if embeddings.ndim != 2 or embeddings.shape[0] != 2 * issame.size:
        raise ValueError(
            f"expected [2N, D] = [{2 * issame.size}, D] embeddings for {issame.size} pairs, "
            f"got shape {embeddings.shape}"
        )
    return evaluate(embeddings[0::2], embeddings[1::2], issame, **kwargs)


def verify_binset(
    embedder: Callable[[np.ndarray], np.ndarray],
    binset: BinSet,
    batch_size: int = 128,
    flip: bool = True,
    progress: bool = False,
    **kwargs,
) -> dict:
    """Embed a loaded `.bin` and evaluate it; adds "name", "embed_seconds", "images_per_second"."""
    start = time.perf_counter()
    embeddings = embed_images(
        embedder,
        binset.images,
        batch_size,
        flip,
        progress=f"embed {binset.name}" if progress else False,
    )
    seconds = time.perf_counter() - start
    result = evaluate_embeddings(embeddings, binset.issame, **kwargs)
    result["name"] = binset.name
    result["embed_seconds"] = seconds
    result["images_per_second"] = len(binset.images) / seconds if seconds > 0 else float("inf")
    return result


def verify_bin(
    embedder: Callable[[np.ndarray], np.ndarray],
    path: str | os.PathLike,
    batch_size: int = 128,
    flip: bool = True,
    progress: bool = False,
    **kwargs,
) -> dict:
    """Load, embed and evaluate one `.bin` file (see `evaluate` for the keys)."""
    return verify_binset(
        embedder, load_bin(path, progress=progress), batch_size, flip, progress, **kwargs
    )
