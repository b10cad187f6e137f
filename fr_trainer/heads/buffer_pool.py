"""Reused CPU buffers for the head's big per-step temporaries.

Each step the head needs the same few large tensors: its [G, C_local] logit buffer (kept
from forward to backward, then overwritten by the gradient H) and, in mixed precision, the
16-bit copy of its centres. Freshly allocated, each one is `mmap`ed by malloc and faulted
in and zeroed by the kernel on first touch, then unmapped at its end: on a CPU that costs
about as much as writing it twice (`fr_trainer/hugepage_malloc.py` has the figures). So on
a CPU (the device policy's `reuse_buffers`) the head takes them from this pool and gives
them back when its backward is done with them; the next step gets the same pages.

A buffer is handed to one user at a time: `take` gives a free buffer of the exact shape,
dtype and device or a new one, `give` returns it. A forward whose backward never runs
(inference, a failed step) simply never gives its buffers back, and they are freed as
usual. The pool keeps at most `MAX_FREE_PER_KEY` free buffers of each shape; `clear()`
drops them all (what the pool holds between steps is the head's own peak, not more).
CUDA needs none of this: torch's caching allocator already reuses device memory.
"""

from __future__ import annotations

import torch

MAX_FREE_PER_KEY = 2

_Key = tuple[tuple[int, ...], torch.dtype, torch.device]
_free: dict[_Key, list[torch.Tensor]] = {}


def _key(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> _Key:
    return tuple(shape), dtype, torch.device(device)


def take(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """An uninitialised contiguous tensor, reused if one of this kind was given back."""
    free = _free.get(_key(shape, dtype, device))
    if free:
        return free.pop()
    return torch.empty(shape, dtype=dtype, device=device)


def take_if(reuse: bool, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """`take` when `reuse` (a policy's `reuse_buffers`), else a fresh tensor."""
    return take(shape, dtype, device) if reuse else torch.empty(shape, dtype=dtype, device=device)


def give(tensor: torch.Tensor | None) -> None:
    """Return a tensor from `take` (its user must hold no other reference it still uses)."""
    if tensor is None or not tensor.is_contiguous() or tensor.requires_grad:
        return
    free = _free.setdefault(_key(tuple(tensor.shape), tensor.dtype, tensor.device), [])
    if len(free) < MAX_FREE_PER_KEY and not any(t.data_ptr() == tensor.data_ptr() for t in free):
        free.append(tensor)


def clear() -> None:
    """Free every buffer the pool holds."""
    _free.clear()


def held_bytes() -> int:
    """Bytes of the free buffers the pool holds now."""
    return sum(t.numel() * t.element_size() for free in _free.values() for t in free)
