"""MegaFace-style identification and verification against distractors.

    result = evaluate_megaface(embedder, probes_dir, distractors_dir, model_path=...)

Probes: `probes_dir/<identity>/<image>` (FaceScrub's role). Distractors: every image
under `distractors_dir` (MegaFace's role), sorted by relative path; the first n of that
order are "n distractors". A noise list names images (relative to either root, with or
without suffix) that are left out.

Identification (the MegaFace challenge-1 protocol): for every identity with at least two
images and every ordered pair (p, g) of its images, p is searched against the gallery
{g} + n distractors. The rank of g is 1 + the number of distractors whose score is >= the
score of g (a tie with a distractor is a miss). CMC rank-r = fraction of the pairs with
rank <= r, for r = 1..10 and n = 10, 100, ..., N (and N).

Verification: genuine pairs are the unordered pairs of probe images of one identity;
impostor pairs are every (probe image, distractor) pair, M = P x N. TAR@FAR follows
`fr_trainer.eval.allpairs` (threshold = the (m+1)-th largest impostor score, accept
score > threshold, m = the largest integer with m / M <= FAR), exactly, from a top-(m+1)
search per probe (the global (m+1)-th largest is within the union of those lists); FARs
below 1 / M are flagged not resolvable.

Distractor embeddings are computed once and cached as `.npy` under the cache directory,
keyed by the SHA-256 of the model file, the flip setting and the distractor list; a
cache entry is reused only when all three match (so another model never reuses it).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from fr_trainer.eval.allpairs import allowed_false_accepts
from fr_trainer.eval.embedder import embed_images
from fr_trainer.eval.imagefolder import ImageList, is_noise, list_images
from fr_trainer.eval.resolution import is_resolvable, smallest_resolvable_far
from fr_trainer.eval.search import topk_search

MEGAFACE_FARS: tuple[float, ...] = (1e-6,)
CMC_RANKS = 10


def distractor_counts(total: int) -> list[int]:
    """10, 100, ..., up to `total`, and `total` itself."""
    counts = []
    n = 10
    while n < total:
        counts.append(n)
        n *= 10
    counts.append(total)
    return counts


def load_probes(root: str | os.PathLike, noise: set[str]) -> tuple[list[Path], np.ndarray, list[str]]:
    """(paths, identity labels, identity names) of `root/<identity>/...`, minus the noise."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"probe directory {root} does not exist (expected <root>/<identity>/<image>)")
    paths, labels, names = [], [], []
    for name in sorted(d.name for d in root.iterdir() if d.is_dir()):
        files = [p for p in list_images(root / name) if not is_noise(p.relative_to(root).as_posix(), noise)]
        if len(files) < 2:
            continue  # an identity needs a probe and a gallery image
        names.append(name)
        paths.extend(files)
        labels.extend([len(names) - 1] * len(files))
    if not paths:
        raise ValueError(f"no identity under {root} has two or more images (after the noise list)")
    return paths, np.asarray(labels, dtype=np.int64), names


def load_distractors(root: str | os.PathLike, noise: set[str]) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"distractor directory {root} does not exist")
    paths = [p for p in list_images(root) if not is_noise(p.relative_to(root).as_posix(), noise)]
    if not paths:
        raise ValueError(f"no distractor images under {root}")
    return paths


def _file_digest(path: Path) -> str:
    """SHA-256 of a model file, or of every file (names and bytes) of a checkpoint directory."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(file.relative_to(path).as_posix().encode() if path.is_dir() else b"")
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def cache_key(model_path: str | os.PathLike, flip: bool, paths: Sequence[Path], root: Path) -> str:
    """SHA-256 over the model file's bytes, the flip setting and the distractor list."""
    digest = hashlib.sha256()
    digest.update(_file_digest(Path(model_path)).encode())
    digest.update(b"flip" if flip else b"noflip")
    for p in paths:
        digest.update(p.relative_to(root).as_posix().encode() + b"\n")
    return digest.hexdigest()[:32]


def _normalize(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def cached_distractor_embeddings(
    embedder: Callable[[np.ndarray], np.ndarray],
    paths: Sequence[Path],
    root: Path,
    cache_dir: Path | None,
    model_path: str | os.PathLike | None,
    batch_size: int,
    flip: bool,
    progress: bool,
) -> tuple[np.ndarray, bool]:
    """(normalised distractor embeddings [N, D] (a read-only memmap when cached), reused?)."""
    if cache_dir is None or model_path is None:
        emb = embed_images(embedder, ImageList(paths), batch_size, flip, progress="distractors" if progress else False)
        return _normalize(emb), False
    key = cache_key(model_path, flip, paths, root)
    file = Path(cache_dir) / f"distractors_{key}.npy"
    if file.exists():
        return np.load(file, mmap_mode="r"), True
    emb = embed_images(embedder, ImageList(paths), batch_size, flip, progress="distractors" if progress else False)
    emb = _normalize(emb)
    file.parent.mkdir(parents=True, exist_ok=True)
    partial = file.with_suffix(".partial.npy")
    np.save(partial, emb)
    os.replace(partial, file)  # a crash never leaves a truncated cache entry
    (file.with_suffix(".json")).write_text(
        json.dumps({"model": str(model_path), "flip": flip, "distractors": len(paths), "root": str(root)}, indent=2)
    )
    return np.load(file, mmap_mode="r"), False


def _genuine_pairs(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ordered pairs (p, g), p != g, of images of one identity."""
    ps, gs = [], []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        p, g = np.meshgrid(members, members, indexing="ij")
        keep = p != g
        ps.append(p[keep])
        gs.append(g[keep])
    return np.concatenate(ps), np.concatenate(gs)


def _probe_scores(probe_emb: np.ndarray) -> np.ndarray:
    """Probe x probe scores from an fp32 GEMM, like the distractor scores of the search."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(probe_emb, dtype=np.float32))
    return torch.mm(x, x.T).numpy()


def identification(
    probe_emb: np.ndarray,
    labels: np.ndarray,
    distractors,
    counts: Sequence[int],
    device: str = "cpu",
    memory_budget: int = 1 << 30,
    progress: bool = False,
) -> dict[int, dict[int, float]]:
    """{n: {rank r: CMC}} for r = 1..10 (see the module doc)."""
    p, g = _genuine_pairs(labels)
    genuine = _probe_scores(probe_emb)[p, g]
    cmc: dict[int, dict[int, float]] = {}
    for n in counts:
        top, _ = topk_search(
            probe_emb,
            distractors[:n],
            CMC_RANKS,
            device=device,
            memory_budget=memory_budget,
            progress=f"{n} distractors" if progress else False,
        )
        beaten = (top[p] >= genuine[:, None]).sum(axis=1)  # distractors at or above g, capped at 10
        rank = 1 + beaten
        cmc[int(n)] = {r: float((rank <= r).mean()) for r in range(1, CMC_RANKS + 1)}
    return cmc


def verification(
    probe_emb: np.ndarray,
    labels: np.ndarray,
    distractors,
    fars: Sequence[float] = MEGAFACE_FARS,
    device: str = "cpu",
    memory_budget: int = 1 << 30,
    progress: bool = False,
) -> dict:
    """TAR@FAR with probe-probe genuine pairs and probe x distractor impostors."""
    num_probes, num_distractors = probe_emb.shape[0], int(distractors.shape[0])
    num_imp = num_probes * num_distractors
    i, j = np.triu_indices(num_probes, k=1)
    same = labels[i] == labels[j]
    genuine = _probe_scores(probe_emb)[i[same], j[same]]
    allowed = {f: allowed_false_accepts(f, num_imp) for f in fars}
    k = min(num_distractors, max(allowed.values()) + 1)
    top, _ = topk_search(
        probe_emb,
        distractors,
        k,
        device=device,
        memory_budget=memory_budget,
        progress="verification" if progress else False,
    )
    pooled = np.sort(top.reshape(-1))[::-1]
    tar, threshold, resolvable = {}, {}, {}
    for far, m in allowed.items():
        resolvable[far] = is_resolvable(far, num_imp)
        if m >= num_imp:
            tar[far], threshold[far] = 1.0, -math.inf
            continue
        t = float(pooled[m])
        threshold[far] = t
        tar[far] = float((genuine > t).mean()) if genuine.size else float("nan")
    return {
        "tar_at_far": tar,
        "threshold": threshold,
        "far_resolvable": resolvable,
        "num_impostors": num_imp,
        "num_genuine": int(genuine.size),
        "smallest_resolvable_far": smallest_resolvable_far(num_imp),
    }


def evaluate_megaface(
    embedder: Callable[[np.ndarray], np.ndarray],
    probes_dir: str | os.PathLike,
    distractors_dir: str | os.PathLike,
    *,
    model_path: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    noise: set[str] | None = None,
    counts: Sequence[int] | None = None,
    fars: Sequence[float] = MEGAFACE_FARS,
    batch_size: int = 128,
    flip: bool = True,
    device: str = "cpu",
    memory_budget: int = 1 << 30,
    progress: bool = False,
) -> dict:
    """Identification CMC at each distractor count and TAR@FAR (see the module doc)."""
    start = time.perf_counter()
    noise = noise or set()
    probe_paths, labels, names = load_probes(probes_dir, noise)
    distractor_paths = load_distractors(distractors_dir, noise)
    probe_emb = _normalize(
        embed_images(embedder, ImageList(probe_paths), batch_size, flip, progress="probes" if progress else False)
    )
    distractors, reused = cached_distractor_embeddings(
        embedder,
        distractor_paths,
        Path(distractors_dir),
        Path(cache_dir) if cache_dir else None,
        model_path,
        batch_size,
        flip,
        progress,
    )
    if distractors.shape[1] != probe_emb.shape[1]:
        raise ValueError(f"cached distractors have D={distractors.shape[1]} but the model gives D={probe_emb.shape[1]}")
    counts = sorted(
        {int(c) for c in (counts or distractor_counts(len(distractor_paths))) if 0 < c <= len(distractor_paths)}
    )
    cmc = identification(probe_emb, labels, distractors, counts, device, memory_budget, progress)
    ver = verification(probe_emb, labels, distractors, fars, device, memory_budget, progress)
    return {
        "identities": len(names),
        "probe_images": len(probe_paths),
        "distractors": len(distractor_paths),
        "noise_entries": len(noise),
        "cmc": cmc,
        "rank1": {n: ranks[1] for n, ranks in cmc.items()},
        "verification": ver,
        "distractor_cache_reused": reused,
        "seconds": time.perf_counter() - start,
    }
