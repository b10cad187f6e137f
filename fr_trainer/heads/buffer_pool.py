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
_outgoing: dict[_Key, list[torch.Tensor]] = {}  # aliases of the storages handed out by take_outgoing


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


def give_if(reuse: bool, tensor: torch.Tensor | None) -> None:
    """`give` when `reuse` (a policy's `reuse_buffers`; the tensor came from `take_if`)."""
    if reuse:
        give(tensor)


def give(tensor: torch.Tensor | None) -> None:
    """Return a tensor from `take` (its user must hold no other reference it still uses)."""
    if tensor is None or not tensor.is_contiguous() or tensor.requires_grad:
        return
    free = _free.setdefault(_key(tuple(tensor.shape), tensor.dtype, tensor.device), [])
    if len(free) < MAX_FREE_PER_KEY and not any(t.data_ptr() == tensor.data_ptr() for t in free):
        free.append(tensor)


def _storage_users(tensor: torch.Tensor) -> int:
    return torch._C._storage_Use_Count(tensor.untyped_storage()._cdata)


def _alias(tensor: torch.Tensor) -> torch.Tensor:
    """A second tensor on `tensor`'s storage (not a view: it holds no reference to
    `tensor` itself, so autograd may still take `tensor` over as a parameter's .grad)."""
    return torch.empty(0, dtype=tensor.dtype, device=tensor.device).set_(
        tensor.untyped_storage(), tensor.storage_offset(), tensor.shape, tensor.stride())


def _users_of_an_unshared_storage() -> int:
    probe = torch.empty(1)
    alias = _alias(probe)
    del probe
    return _storage_users(alias)


_UNSHARED = _users_of_an_unshared_storage()


def take_outgoing(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """An uninitialised contiguous tensor that leaves the head for good: a gradient that
    autograd hands to a parameter's `.grad`, which the optimizer's `zero_grad` drops.

    The pool keeps an alias of each storage it hands out and gives a storage out again
    once nothing but that alias refers to it (the `.grad` that held it was set to None,
    or autograd added it into an existing `.grad` and let it go), so the next step writes
    into pages that are already mapped. A storage anything else still holds (a `.grad`
    kept across steps, a tensor the user saved) is never handed out twice. At most
    `MAX_FREE_PER_KEY` storages of each kind are kept."""
    key = _key(shape, dtype, device)
    aliases = _outgoing.setdefault(key, [])
    for alias in aliases:
        if _storage_users(alias) == _UNSHARED:
            return torch.empty(0, dtype=dtype, device=device).set_(alias.untyped_storage(), 0, key[0])
    tensor = torch.empty(shape, dtype=dtype, device=device)
    if len(aliases) < MAX_FREE_PER_KEY:
        aliases.append(_alias(tensor))
    return tensor


def take_outgoing_if(reuse: bool, shape: tuple[int, ...], dtype: torch.dtype,
                     device: torch.device | str) -> torch.Tensor:
    """`take_outgoing` when `reuse` (a policy's `reuse_buffers`), else a fresh tensor."""
    return take_outgoing(shape, dtype, device) if reuse else torch.empty(shape, dtype=dtype, device=device)


def clear() -> None:
    """Free every buffer the pool holds (outgoing storages still in use stay with their users)."""
    _free.clear()
    _outgoing.clear()


def outgoing_bytes() -> int:
    """Bytes of the outgoing storages that nothing but the pool holds now."""
    return sum(t.numel() * t.element_size() for aliases in _outgoing.values() for t in aliases
               if _storage_users(t) == _UNSHARED)


def held_bytes() -> int:
    """Bytes of the free buffers the pool holds now (free outgoing storages included)."""
    return sum(t.numel() * t.element_size() for tensors in _free.values() for t in tensors) + outgoing_bytes()
