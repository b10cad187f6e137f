"""Exact top-k similarity search of probes against a large gallery, in bounded memory.

    scores, indices = topk_search(probes, gallery, k=10, memory_budget=1 << 30)

The gallery is a tensor, a numpy array, or an on-disk float16/float32 `np.memmap` of
N x D embeddings. It is read in chunks of rows; each chunk is multiplied with a block of
probes (one fp32 GEMM), the chunk's top-k is taken and merged with the running top-k.
The answer is exact: the scores are the k largest inner products of each probe (the
scores of the GEMM, fp32), sorted in decreasing order, ties broken by the smaller
gallery index; nothing is approximated or pruned. Normalise the rows yourself (or pass
`normalize=True`) for cosine similarity.

Memory: the working set (score block, gallery chunk and its fp32 copy, running top-k) is
kept under `memory_budget` bytes; `plan_chunks` says how the budget is split. The memmap's
pages are the page cache's, not counted. `device="cuda"` runs the GEMMs and the merges on
the GPU (chunks are copied there); the result comes back to the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fr_trainer.eval.gallery_reader import GalleryReader, as_fp32

DEFAULT_SEARCH_BUDGET = 1 << 30  # bytes


@dataclass(frozen=True)
class SearchPlan:
    """How a search is cut: `probe_chunk` probes x `gallery_chunk` gallery rows per GEMM."""

    probe_chunk: int
    gallery_chunk: int
    bytes_per_step: int


def plan_chunks(
    num_probes: int, num_gallery: int, dim: int, k: int, memory_budget: int, gallery_itemsize: int = 4
) -> SearchPlan:
    """The largest chunks whose working set fits `memory_budget` bytes.

    Per step: the fp32 score block [p, g] and the candidate buffers [p, g + k] (values and
    int64 indices of the chunk's top-k), the gallery chunk as read [g, D] and as fp32
    [g, D], the probe block [p, D]. All probes are taken at once when that leaves room for
    a gallery chunk of at least 4096 rows (or the whole gallery).
    """
    if memory_budget <= 0:
        raise ValueError(f"memory_budget must be positive, got {memory_budget} bytes")
    p = max(1, num_probes)
    wanted_g = min(max(num_gallery, 1), 4096)

    def step_bytes(pc: int, gc: int) -> int:
        top = pc * 2 * k * (4 + 8)
        return pc * gc * 4 + top + gc * dim * (gallery_itemsize + 4) + pc * dim * 4

    while p > 1 and step_bytes(p, wanted_g) > memory_budget:
        p = (p + 1) // 2
    fixed = p * 2 * k * 12 + p * dim * 4
    per_row = p * 4 + dim * (gallery_itemsize + 4)
    g = (memory_budget - fixed) // per_row
    if g < max(1, min(k, num_gallery)):
        need = step_bytes(1, max(k, 1))
        raise ValueError(
            f"memory_budget {memory_budget} bytes is too small for k={k}, D={dim}; give at least {need} bytes"
        )
    g = int(min(g, max(num_gallery, 1)))
    if GROUP_STRIDE <= g < num_gallery:  # whole groups of columns (see _chunk_topk)
        g -= g % GROUP_STRIDE
    return SearchPlan(probe_chunk=int(p), gallery_chunk=g, bytes_per_step=step_bytes(p, g))


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def merge_topk(
    scores_a: torch.Tensor, index_a: torch.Tensor, scores_b: torch.Tensor, index_b: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k of two candidate sets [P, *], sorted by decreasing score, then index.

    Ties are broken by the smaller index, so merging chunk by chunk in any grouping gives
    the same answer as one sort of all candidates.
    """
    scores = torch.cat([scores_a, scores_b], dim=1)
    index = torch.cat([index_a, index_b], dim=1)
    # sort by index first, then stably by score: equal scores keep the index order
    by_index = torch.argsort(index, dim=1, stable=True)
    scores = torch.gather(scores, 1, by_index)
    index = torch.gather(index, 1, by_index)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return torch.gather(scores, 1, order), torch.gather(index, 1, order)


GROUP_STRIDE = 16  # rows of the [P, S, C / S] view whose column maxima pick the candidates


def _chunk_topk(block: torch.Tensor, k: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A chunk's top-k [P, min(k, C)] with the smallest-index rule on ties.

    `torch.topk` over a wide score block costs several times a vectorised pass over it, so
    the columns are cut into C / S groups of S = `GROUP_STRIDE` columns each (group j holds
    columns j, j + C/S, j + 2C/S, ...: the maxima of all groups are one vectorised `amax`
    over the [P, S, C / S] view). The k groups with the largest maxima hold every score of
    the row's top-k: the k-th largest score is at least the k-th largest group maximum (those
    maxima are k distinct scores), and every group left out has a smaller maximum whenever
    the (k+1)-th group maximum is below the k-th. Rows where the two are equal are redone
    over all their columns. The top-k of the k x S candidates is then exact.
    """
    num_rows, width = block.shape
    num_groups = width // GROUP_STRIDE
    if width % GROUP_STRIDE or num_groups < 4 * (k + 1):
        return _chunk_topk_rows(block, k, offset)
    group_max = block.view(num_rows, GROUP_STRIDE, num_groups).amax(dim=1)
    top_groups = torch.topk(group_max, k + 1, dim=1, sorted=True)
    groups = torch.sort(top_groups.indices[:, :k], dim=1).values  # ascending: so are the columns below
    steps = torch.arange(GROUP_STRIDE, device=block.device) * num_groups
    cols = (steps[None, :, None] + groups[:, None, :]).reshape(num_rows, GROUP_STRIDE * k)
    values, picked = _chunk_topk_rows(torch.gather(block, 1, cols), k, 0)
    cols = torch.gather(cols, 1, picked)
    tied = top_groups.values[:, k] == top_groups.values[:, k - 1]
    if bool(tied.any()):
        rows = torch.nonzero(tied).flatten()
        values[rows], cols[rows] = _chunk_topk_rows(block[rows], k, 0)
    return values, cols + offset


def _chunk_topk_rows(block: torch.Tensor, k: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A chunk's top-k [P, min(k, C)] with the smallest-index rule on ties, over every
    column of each row.

    `torch.topk` picks arbitrarily among scores equal to the k-th; rows where the
    (k+1)-th largest equals the k-th (rare with real embeddings) are redone with a
    stable sort.
    """
    kk = min(k, block.shape[1])
    if kk == block.shape[1]:
        exact = torch.sort(block, dim=1, descending=True, stable=True)
        return exact.values, exact.indices + offset
    # the (k+1)-th largest equal to the k-th means a tie at the boundary
    values, cols = torch.topk(block, kk + 1, dim=1, largest=True, sorted=True)
    ties_at_boundary = values[:, kk] == values[:, kk - 1]
    values, cols = values[:, :kk], cols[:, :kk]
    if bool(ties_at_boundary.any()):
        rows = torch.nonzero(ties_at_boundary).flatten()
        exact = torch.sort(block[rows], dim=1, descending=True, stable=True)
        values[rows] = exact.values[:, :kk]
        cols[rows] = exact.indices[:, :kk]
    return values, cols + offset


def topk_search(
    probes,
    gallery,
    k: int,
    *,
    device: str | torch.device = "cpu",
    memory_budget: int = DEFAULT_SEARCH_BUDGET,
    normalize: bool = False,
    progress: bool | str = False,
    plan: SearchPlan | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The k most similar gallery rows of every probe, exactly.

    Args:
        probes: [P, D] (tensor or array; converted to fp32).
        gallery: [N, D] tensor, array or float16/float32 memmap; read chunk by chunk.
        k: neighbours per probe (k > N gives N, padded with -inf / -1).
        device: where the GEMMs run ("cpu", "cuda", "cuda:1", ...).
        memory_budget: bytes for the working set (see `plan_chunks`).
        normalize: L2-normalise probes and every gallery chunk first (cosine similarity).
        progress: a tqdm bar over gallery rows (a str is its description).
        plan: force a chunking (tests); default `plan_chunks(...)`.
    Returns:
        scores float32 [P, k] (decreasing per row) and indices int64 [P, k] into the
        gallery (ties: smaller index first); -inf / -1 where N < k.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    device = torch.device(device)
    if getattr(gallery, "ndim", None) != 2 or getattr(probes, "ndim", None) != 2:
        raise ValueError(
            f"probes and gallery must be 2-D [rows, D]; got shapes {tuple(getattr(probes, 'shape', ()))} "
            f"and {tuple(getattr(gallery, 'shape', ()))}"
        )
    num_probes, dim = int(probes.shape[0]), int(probes.shape[1])
    num_gallery = int(gallery.shape[0])
    if int(gallery.shape[1]) != dim:
        raise ValueError(f"probes have D={dim} but the gallery has D={gallery.shape[1]}; embed both with one model")
    itemsize = gallery.element_size() if isinstance(gallery, torch.Tensor) else np.dtype(gallery.dtype).itemsize
    plan = plan or plan_chunks(num_probes, num_gallery, dim, k, memory_budget, itemsize)
    probes_t = as_fp32(probes, torch.device("cpu"))
    if normalize:
        probes_t = _normalize(probes_t)
    out_scores = torch.full((num_probes, k), -torch.inf)
    out_index = torch.full((num_probes, k), -1, dtype=torch.int64)
    bar = None
    if progress:
        from tqdm import tqdm

        total = num_gallery * ((num_probes + plan.probe_chunk - 1) // plan.probe_chunk)
        bar = tqdm(total=total, unit="row", unit_scale=True, desc=progress if isinstance(progress, str) else "search")
    sentinel = torch.iinfo(torch.int64).max
    for p0 in range(0, num_probes, plan.probe_chunk):
        block = probes_t[p0 : p0 + plan.probe_chunk].to(device)
        best_s = torch.full((block.shape[0], 0), -torch.inf, device=device)
        best_i = torch.full((block.shape[0], 0), sentinel, dtype=torch.int64, device=device)
        scores_buf = None
        with GalleryReader(gallery, device) as reader:
            for g0 in range(0, num_gallery, plan.gallery_chunk):
                chunk = reader.read(g0, min(g0 + plan.gallery_chunk, num_gallery))
                if normalize:
                    chunk = _normalize(chunk)
                if scores_buf is None or scores_buf.shape[1] != chunk.shape[0]:
                    scores_buf = torch.empty((block.shape[0], chunk.shape[0]), device=device)
                torch.mm(block, chunk.T, out=scores_buf)
                values, cols = _chunk_topk(scores_buf, k, g0)
                best_s, best_i = merge_topk(best_s, best_i, values, cols, k)
                if bar is not None:
                    bar.update(chunk.shape[0])
        found = best_s.shape[1]
        best_i = torch.where(best_i == sentinel, torch.full_like(best_i, -1), best_i)
        out_scores[p0 : p0 + block.shape[0], :found] = best_s.cpu()
        out_index[p0 : p0 + block.shape[0], :found] = best_i.cpu()
    if bar is not None:
        bar.close()
    return out_scores.numpy(), out_index.numpy()


def brute_force_topk(probes: np.ndarray, gallery: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference: all scores in float64, sorted by (score desc, index asc); for tests."""
    scores = np.asarray(probes, np.float64) @ np.asarray(gallery, np.float64).T
    n = scores.shape[1]
    order = np.lexsort((np.broadcast_to(np.arange(n), scores.shape), -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, axis=1), order
