"""`fr-trainer bench search` and `fr-trainer bench allpairs`: evaluation at scale vs the GEMM floor.

    fr-trainer bench search [--probes 3530] [--gallery 1000000] [--dim 512] [--k 10] [--dir /tmp]
    fr-trainer bench allpairs [--n 100000] [--dim 512] [--per-class 10]

search: writes an N x D fp32 memmap of random unit rows (or reuses it), then times the
floor (the same chunked GEMMs `probes @ chunk.T` into preallocated outputs, with the
whole gallery already in RAM as one tensor, all allocated before the clock starts),
`topk_search` on the memmap, and the floor again; the ratio is against the mean of the
two floors, so load drifting during the run hits both sides. The peak anonymous memory (RssAnon, sampled every 50 ms)
above the value before the search is reported: the memmap's page-cache pages are not in it.

allpairs: N rows (`--per-class` images per identity, centre + noise, unit norm), times
the floor (the upper-triangle block GEMMs at the block size `all_pairs_verification`
uses, into a preallocated block), `all_pairs_verification`, and the floor again.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import threading
import time
from pathlib import Path

import numpy as np
import torch

from fr_trainer.devices import synchronize


def _rss_anon_kb() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class PeakAnon:
    """Samples RssAnon in a thread; `peak_mb` above the value at start."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.start_kb = _rss_anon_kb()
        self.peak_kb = self.start_kb
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_kb = max(self.peak_kb, _rss_anon_kb())

    def __enter__(self) -> PeakAnon:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_kb = max(self.peak_kb, _rss_anon_kb())

    @property
    def peak_mb(self) -> float:
        return (self.peak_kb - self.start_kb) / 1024


def _machine() -> dict:
    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "load_average": os.getloadavg(),
        "torch": torch.__version__,
    }


def write_gallery(path: Path, n: int, dim: int, seed: int = 0, chunk: int = 65536) -> np.memmap:
    """An n x dim float32 memmap of random unit rows (reused when it exists at that size)."""
    expected = n * dim * 4
    if not (path.exists() and path.stat().st_size == expected):
        out = np.memmap(path, dtype=np.float32, mode="w+", shape=(n, dim))
        rng = np.random.default_rng(seed)
        for start in range(0, n, chunk):
            x = rng.standard_normal((min(chunk, n - start), dim), dtype=np.float32)
            out[start : start + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
        out.flush()
        del out
    return np.memmap(path, dtype=np.float32, mode="r", shape=(n, dim))


def _search_floor(gallery: np.ndarray, probes: np.ndarray, plan, device: str = "cpu") -> float:
    """The search's GEMMs alone: gallery in (device) memory, outputs allocated before the
    clock starts."""
    in_ram = torch.from_numpy(np.array(gallery)).to(device)
    p = torch.from_numpy(probes).to(device)
    blocks = [
        (p0, g0) for p0 in range(0, len(probes), plan.probe_chunk) for g0 in range(0, len(in_ram), plan.gallery_chunk)
    ]
    shapes = {(min(plan.probe_chunk, len(probes) - p0), min(plan.gallery_chunk, len(in_ram) - g0)) for p0, g0 in blocks}
    outs = {shape: torch.empty(shape, device=device) for shape in shapes}
    for out in outs.values():
        out.zero_()  # touch the pages before the clock
    synchronize(device)
    t0 = time.perf_counter()
    for p0, g0 in blocks:
        pb = p[p0 : p0 + plan.probe_chunk]
        chunk = in_ram[g0 : g0 + plan.gallery_chunk]
        torch.mm(pb, chunk.T, out=outs[(pb.shape[0], chunk.shape[0])])
    synchronize(device)
    return time.perf_counter() - t0


def bench_search(args: argparse.Namespace) -> dict:
    from fr_trainer.eval.search import plan_chunks, topk_search

    path = Path(args.dir) / f"fr_trainer_gallery_{args.gallery}x{args.dim}.f32"
    t0 = time.perf_counter()
    gallery = write_gallery(path, args.gallery, args.dim)
    write_s = time.perf_counter() - t0
    rng = np.random.default_rng(1)
    probes = rng.standard_normal((args.probes, args.dim), dtype=np.float32)
    probes /= np.linalg.norm(probes, axis=1, keepdims=True)
    plan = plan_chunks(args.probes, args.gallery, args.dim, args.k, args.budget)
    result = {"plan": plan.__dict__, "write_seconds": write_s, "machine_before": _machine()}
    rounds = []
    for _ in range(args.rounds):
        before = _search_floor(gallery, probes, plan, args.device)
        with PeakAnon() as mem:
            t0 = time.perf_counter()
            topk_search(probes, gallery, args.k, memory_budget=args.budget, progress=not args.quiet,
                        device=args.device)
            synchronize(args.device)
            search = time.perf_counter() - t0
        after = _search_floor(gallery, probes, plan, args.device)
        floor = (before + after) / 2
        rounds.append(
            {
                "floor_before_s": before,
                "search_s": search,
                "floor_after_s": after,
                "ratio": search / floor,
                "peak_anon_mb": mem.peak_mb,
            }
        )
        print(json.dumps(rounds[-1]), flush=True)
    result["rounds"] = rounds
    result["machine_after"] = _machine()
    if not args.keep:
        path.unlink(missing_ok=True)
    return result


def labelled_set(n: int, dim: int, per_class: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n unit rows, `per_class` per identity: centre + noise (genuine cosine ~0.3)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) // per_class
    centres = rng.standard_normal((labels[-1] + 1, dim), dtype=np.float32)
    emb = centres[labels] + 1.5 * rng.standard_normal((n, dim), dtype=np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return emb, labels


def _allpairs_floor(x: torch.Tensor, block: int) -> float:
    """The upper-triangle block GEMMs alone, into a block allocated (and touched) before the clock."""
    n = x.shape[0]
    out = torch.zeros(block, block)
    t0 = time.perf_counter()
    for i0 in range(0, n, block):
        rows = x[i0 : i0 + block]
        for j0 in range(i0, n, block):
            cols = x[j0 : j0 + block]
            full = rows.shape[0] == block and cols.shape[0] == block
            torch.mm(rows, cols.T, out=out if full else None)
    return time.perf_counter() - t0


def bench_allpairs(args: argparse.Namespace) -> dict:
    from fr_trainer.eval.allpairs import all_pairs_verification, block_size_for_budget

    emb, labels = labelled_set(args.n, args.dim, args.per_class)
    block = block_size_for_budget(args.budget, args.n)
    x = torch.from_numpy(emb)
    fars = [float(f) for f in args.fars]
    rounds = []
    for _ in range(args.rounds):
        before = _allpairs_floor(x, block)
        with PeakAnon() as mem:
            t0 = time.perf_counter()
            res = all_pairs_verification(emb, labels, fars, memory_budget=args.budget, progress=not args.quiet)
            seconds = time.perf_counter() - t0
        after = _allpairs_floor(x, block)
        floor = (before + after) / 2
        rounds.append(
            {
                "floor_before_s": before,
                "allpairs_s": seconds,
                "floor_after_s": after,
                "ratio": seconds / floor,
                "passes": res.passes,
                "peak_anon_mb": mem.peak_mb,
                "num_impostors": res.num_impostors,
                "num_genuine": res.num_genuine,
                "tar_at_far": {str(f): r.tar for f, r in res.results.items()},
                "resolvable": {str(f): r.resolvable for f, r in res.results.items()},
            }
        )
        print(json.dumps(rounds[-1]), flush=True)
    return {"block": block, "rounds": rounds, "machine": _machine()}


def _parser(kind: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"fr-trainer bench {kind}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    parser.add_argument("--quiet", action="store_true")
    if kind == "search":
        parser.add_argument("--probes", type=int, default=3530)
        parser.add_argument("--gallery", type=int, default=1_000_000)
        parser.add_argument("--k", type=int, default=10)
        parser.add_argument("--budget", type=int, default=1 << 30, help="bytes (default 1 GiB)")
        parser.add_argument("--dir", default="/tmp", help="where the memmap is written")
        parser.add_argument("--keep", action="store_true", help="keep the memmap file")
        parser.add_argument("--device", default="cpu", help="cpu or cuda (the gallery streams from the memmap)")
    else:
        parser.add_argument("--n", type=int, default=100_000)
        parser.add_argument("--per-class", type=int, default=10)
        parser.add_argument("--budget", type=int, default=512 << 20, help="bytes (default 512 MiB)")
        parser.add_argument("--fars", type=float, nargs="+", default=[1e-9, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3])
    return parser


def _run(kind: str, argv: list[str]) -> int:
    args = _parser(kind).parse_args(argv)
    result = bench_search(args) if kind == "search" else bench_allpairs(args)
    result["command"] = f"fr-trainer bench {kind} " + " ".join(argv)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    return 0


def search_main(argv: list[str]) -> int:
    return _run("search", argv)


def allpairs_main(argv: list[str]) -> int:
    return _run("allpairs", argv)
