"""Chunked logits: no tensor of the full [G, C_local] logit size is ever allocated, nor, with
16-bit GEMMs, a 16-bit copy of more than one chunk of centres; the backward rebuilds every
chunk but the last (kept, and whole). The bf16 backward reads its
kept buffer only through the GEMMs, for every normalised margin. A
non-linear margin in fp32: one [G, C_local] buffer in a step (its cosines)."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from fr_trainer.heads import PartialFC


class LargestStorage(TorchDispatchMode):
    """Records the largest storage (bytes) among the outputs of every aten op (of `dtypes`
    only, when given)."""

    def __init__(self, dtypes: tuple[torch.dtype, ...] | None = None) -> None:
        super().__init__()
        self.largest, self.dtypes = 0, dtypes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and not tensor.is_sparse \
                    and (self.dtypes is None or tensor.dtype in self.dtypes):
                self.largest = max(self.largest, tensor.untyped_storage().nbytes())
        return out


def largest_allocation(chunk_size: int | None, margin: str) -> tuple[int, int]:
    batch, dim, classes = 64, 8, 3000  # batch > dim: the logits outgrow the weights
    head = PartialFC(classes, dim, margin=margin, chunk_size=chunk_size, seed=0)
    x = torch.randn(batch, dim, requires_grad=True)
    y = torch.randint(0, classes, (batch,))
    with LargestStorage() as watch:
        head(x, y).backward()
    return watch.largest, batch * classes * 4


def test_chunked_logits_stay_within_the_chunk() -> None:
    for margin in ("arcface", "cosface"):
        full_largest, logits_bytes = largest_allocation(None, margin)
        assert full_largest >= logits_bytes  # unchunked: the [G, C] buffer exists
        chunked_largest, _ = largest_allocation(500, margin)
        weight_bytes = 3000 * 8 * 4
        assert chunked_largest <= max(64 * 500 * 4, weight_bytes) < logits_bytes


def test_a_chunked_16_bit_head_converts_the_centres_one_chunk_at_a_time() -> None:
    from fr_trainer.heads import buffer_pool

    batch, dim, classes, chunk = 16, 64, 3000, 500  # a whole 16-bit copy: 384 KB; a chunk's: 64 KB
    for dtype in (torch.bfloat16, torch.float16):
        for margin in ("arcface", "sv_arcface"):
            largest = {}
            for chunk_size in (None, chunk):
                buffer_pool.clear()  # (a pooled buffer from an earlier test could be larger)
                head = PartialFC(classes, dim, margin=margin, chunk_size=chunk_size, seed=0, compute_dtype=dtype)
                x = torch.randn(batch, dim, requires_grad=True)
                y = torch.randint(0, classes, (batch,))
                with LargestStorage((torch.bfloat16, torch.float16)) as watch:
                    head(x, y).backward()
                largest[chunk_size] = watch.largest
            assert largest[None] >= classes * dim * 2, (dtype, margin, largest)  # unchunked: the whole copy
            assert largest[chunk] <= max(chunk * dim, batch * chunk) * 2, (dtype, margin, largest)


class LogitSizedStorages(TorchDispatchMode):
    """The distinct storages of at least `nbytes` among the outputs of every aten op."""

    def __init__(self, nbytes: int) -> None:
        super().__init__()
        self.nbytes, self.pointers = nbytes, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and not tensor.is_sparse:
                storage = tensor.untyped_storage()
                if storage.nbytes() >= self.nbytes:
                    self.pointers.add(storage.data_ptr())
        return out


def test_a_non_linear_margin_in_fp32_holds_one_logit_sized_buffer() -> None:
    """The cosines are the only [G, C] buffer of a step (the logits live in row-block scratch),
    where a cosine buffer and a logit buffer used to be two. (Classes enough for the CPU
    policy's row blocks to be a fraction of the buffer.)"""
    batch, dim, classes = 64, 8, 20_000
    for margin in ("sv_arcface", "curricularface", "circle"):
        head = PartialFC(classes, dim, margin=margin, seed=0, block_policy="cpu")
        x = torch.randn(batch, dim, requires_grad=True)
        y = torch.randint(0, classes, (batch,))
        head(x, y).backward()  # the buffer pool's first step
        with LogitSizedStorages(batch * classes * 4) as watch:
            head(x, y).backward()
        assert len(watch.pointers) == 1, (margin, len(watch.pointers))


class GemmWork(TorchDispatchMode):
    """Multiply-adds of every matrix product (mm / addmm, with or without out=)."""

    def __init__(self) -> None:
        super().__init__()
        self.macs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        packet = func.overloadpacket
        if packet in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):
            a, b = args[-2:] if packet is not torch.ops.aten.mm else args[:2]
            self.macs += a.shape[0] * a.shape[1] * b.shape[1]
        return func(*args, **(kwargs or {}))


def gemm_work(chunk_size: int | None, margin: str, compute_dtype: torch.dtype | None) -> int:
    head = PartialFC(3000, 8, margin=margin, chunk_size=chunk_size, seed=0, compute_dtype=compute_dtype)
    x = torch.randn(64, 8, requires_grad=True)
    y = torch.randint(0, 3000, (64,))
    with GemmWork() as work:
        head(x, y).backward()
    return work.macs


def test_a_chunked_step_rebuilds_every_chunk_but_the_last_and_the_last_is_whole() -> None:
    """3,000 classes in chunks of 700: a ragged 200 first, then four whole chunks; the backward
    runs the forward's GEMM again over all but the last (kept) one: 2,300 classes, not 3,000."""
    batch, dim, classes, chunk = 64, 8, 3000, 700
    for margin in ("arcface", "sv_arcface"):
        for compute_dtype in (None, torch.bfloat16):
            full = gemm_work(None, margin, compute_dtype)
            assert full == 3 * batch * dim * classes, (margin, compute_dtype)
            rebuilt = gemm_work(chunk, margin, compute_dtype) - full
            assert rebuilt == batch * dim * (classes - chunk), (margin, compute_dtype)


class BufferTouches(TorchDispatchMode):
    """The aten ops (by name) that read or write a tensor on a storage of `nbytes` bf16 bytes."""

    def __init__(self, nbytes: int) -> None:
        super().__init__()
        self.nbytes, self.ops = nbytes, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for tensor in tree_flatten((args, kwargs or {}))[0]:
            if isinstance(tensor, torch.Tensor) and tensor.dtype == torch.bfloat16 \
                    and tensor.untyped_storage().nbytes() == self.nbytes:
                self.ops.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


# reading the buffer through a GEMM, its views, and the G target entries put / read
GEMM_AND_TARGETS = {"mm", "t", "slice", "transpose", "as_strided", "alias", "view", "index", "index_put_"}


def test_the_bf16_backward_reads_its_kept_buffer_only_through_the_gemms_for_every_normalised_margin() -> None:
    """bf16 GEMMs: the forward folds dz/dcos of a non-linear margin into the exponentials it
    keeps, so the backward makes no elementwise pass over the [G, C] buffer for any margin."""
    batch, dim, classes = 8, 64, 1003  # [8, 1003] bf16: no other tensor of the step has its size
    for margin in ("arcface", "cosface", "sv_arcface", "sv_softmax", "mv_softmax", "curricularface", "circle"):
        head = PartialFC(classes, dim, margin=margin, seed=0, compute_dtype=torch.bfloat16)
        x = torch.randn(batch, dim, requires_grad=True)
        loss = head(x, torch.randint(0, classes, (batch,)))
        with BufferTouches(batch * classes * 2) as watch:
            loss.backward()
        assert watch.ops and watch.ops <= GEMM_AND_TARGETS, (margin, watch.ops - GEMM_AND_TARGETS)
