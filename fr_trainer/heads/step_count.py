"""Counting a head step's aten ops and host syncs (tests of the device policy; gpu_check.sh).

`counting()` counts every aten op of a block, and the host syncs by name. On a CPU, where
`torch.cuda.set_sync_debug_mode` does not exist, a sync is one of the ops that make the
host wait for a device result: `_local_scalar_dense` (`item()`,
`float(t)`, `bool(t)`), `nonzero` and friends (their output size is data), `unique`,
`equal`, `masked_select`, indexing with a boolean mask (a hidden nonzero), and
`Tensor.tolist()` / `Tensor.numpy()`, which read a whole tensor on the host without
dispatching an aten op on the CPU (so they are counted by wrapping the methods). The other
way counts too: `lift_fresh`, a tensor made from host data (`torch.tensor(x, device=...)`,
`t[i] = number`), is on CUDA a blocking copy from pageable host memory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import warnings
from collections import Counter
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNCING_OPS = {
    "_local_scalar_dense", "nonzero", "nonzero_numpy", "argwhere", "unique_dim", "_unique", "_unique2",
    "unique_consecutive", "unique_dim_consecutive", "is_nonzero", "equal", "allclose", "masked_select",
    "masked_scatter", "masked_scatter_", "repeat_interleave", "lift_fresh",
}


def _bool_index(args: tuple) -> bool:
    """A bool/uint8 tensor among the indices of index / index_put (a hidden nonzero)."""
    indices = args[1] if len(args) > 1 else ()
    return isinstance(indices, (list, tuple)) and any(
        isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices)


class OpCounter(TorchDispatchMode):
    """Counts every aten op (`ops`), those that do work (`work_ops`: not views, which launch
    no kernel on a GPU) and the syncing ones (`syncs`, by name)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = self.work_ops = 0
        self.syncs: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        self.work_ops += not func.is_view
        name = func._schema.name.split("::")[-1]
        if name in SYNCING_OPS or (name in ("index", "index_put", "index_put_", "_index_put_impl_")
                                   and _bool_index(args)):
            self.syncs[name] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def counting() -> Iterator[OpCounter]:
    """Counts ops and syncs of the block (host reads by tolist/numpy included). On CUDA
    the syncs CUDA itself reports (`set_sync_debug_mode("warn")`) are counted as well,
    under "cuda"."""
    counter = OpCounter()
    originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}

    def wrap(name: str):
        def host_read(self, *args, **kwargs):
            counter.syncs[name] += 1
            return originals[name](self, *args, **kwargs)
        return host_read

    for name in originals:
        setattr(torch.Tensor, name, wrap(name))
    cuda = torch.cuda.is_available()
    try:
        with warnings.catch_warnings(record=True) as caught, counter:
            warnings.simplefilter("always")
            if cuda:
                torch.cuda.set_sync_debug_mode("warn")
            try:
                yield counter
            finally:
                if cuda:
                    torch.cuda.set_sync_debug_mode("default")
        counter.syncs["cuda"] += sum("synchronizing" in str(w.message) for w in caught)
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)


def count_step(classes: int, dim: int = 128, batch: int = 64, dtype: str = "fp32", device: str = "cpu",
               chunk_size: int | None = None, sample_rate: float = 1.0, margin: str = "arcface",
               block_policy: str | None = None) -> dict:
    """Ops and syncs of one forward + backward of a single-process head (after a warm-up
    step, so that one-off work such as cuBLAS handles is not counted)."""
    from fr_trainer.heads.partial_fc import PartialFC

    compute = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    head = PartialFC(classes, dim, margin=margin, chunk_size=chunk_size, sample_rate=sample_rate, seed=0,
                     compute_dtype=compute, device=device, block_policy=block_policy)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, dim, generator=generator).to(device).requires_grad_()
    y = torch.randint(0, classes, (batch,), generator=generator).to(device)
    head(x, y).backward()
    head.weight.grad = x.grad = None
    with counting() as counter:
        head(x, y).backward()
    host = {k: v for k, v in counter.syncs.items() if k != "cuda"}
    return {"classes": classes, "dtype": dtype, "chunk_size": chunk_size, "sample_rate": sample_rate,
            "device": device, "ops": counter.ops, "syncs": sum(host.values()), "sync_ops": host,
            "cuda_reported_syncs": counter.syncs.get("cuda", 0)}


def main(argv: list[str] | None = None) -> int:
    """`python -m fr_trainer.heads.step_count --device cuda --classes 1000000 10000000`: one
    line of JSON per (classes, dtype); exit 1 if the op count grows with classes or a step
    syncs more than once."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--classes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    rows, ok = [], True
    for dtype in args.dtypes:
        counts = [count_step(c, args.dim, args.batch, dtype, args.device) for c in args.classes]
        for row in counts:
            print(json.dumps(row), flush=True)
        ok &= len({row["ops"] for row in counts}) == 1
        ok &= all(max(row["syncs"], row["cuda_reported_syncs"]) <= 1 for row in counts)
        rows += counts
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"ok": ok, "steps": rows}, handle, indent=2)
    print("ops flat in classes and <= 1 sync per step:", ok)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
