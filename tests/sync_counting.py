"""Counting a head step's aten ops and host syncs on the CPU (for tests of the CUDA policy).

`torch.cuda.set_sync_debug_mode` only exists on a GPU, so the sync count here lists the
ops that make the host wait for a device result: `_local_scalar_dense` (`item()`,
`float(t)`, `bool(t)`), `nonzero` and friends (their output size is data), `unique`,
`equal`, `masked_select`, indexing with a boolean mask (a hidden nonzero), and
`Tensor.tolist()` / `Tensor.numpy()`, which read a whole tensor on the host without
dispatching an aten op on the CPU (so they are counted by wrapping the methods).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNCING_OPS = {
    "_local_scalar_dense", "nonzero", "nonzero_numpy", "argwhere", "unique_dim", "_unique", "_unique2",
    "unique_consecutive", "unique_dim_consecutive", "is_nonzero", "equal", "allclose", "masked_select",
    "masked_scatter", "masked_scatter_", "repeat_interleave",
}


def _bool_index(args: tuple) -> bool:
    """A bool/uint8 tensor among the indices of index / index_put (a hidden nonzero)."""
    indices = args[1] if len(args) > 1 else ()
    return isinstance(indices, (list, tuple)) and any(
        isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices)


class OpCounter(TorchDispatchMode):
    """Counts every aten op (`ops`) and the syncing ones (`syncs`, by name)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.syncs: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        name = func._schema.name.split("::")[-1]
        if name in SYNCING_OPS or (name in ("index", "index_put", "index_put_", "_index_put_impl_")
                                   and _bool_index(args)):
            self.syncs[name] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def counting() -> Iterator[OpCounter]:
    """Counts ops and syncs of the block (host reads by tolist/numpy included)."""
    counter = OpCounter()
    originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}

    def wrap(name: str):
        def host_read(self, *args, **kwargs):
            counter.syncs[name] += 1
            return originals[name](self, *args, **kwargs)
        return host_read

    for name in originals:
        setattr(torch.Tensor, name, wrap(name))
    try:
        with counter:
            yield counter
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)
