"""`fr-trainer bench head`: forward+backward time and peak memory of the PartialFC head.

Three modes run one after the other, each on freshly spawned ranks (so each process's peak
memory is its own):

- floor: the three GEMMs of a linear layer of the same shapes (logits `X W^T`, input grad
  `Z W`, weight grad `Z^T X`) in `--dtype`, the compute a head cannot avoid. Every operand
  and every output buffer is allocated before the clock starts (the GEMMs write with
  `out=`), so the floor times arithmetic, not first-touch page faults of fresh outputs.
  A sub-centre margin's GEMMs run over its k C_local centre rows, and so do its floor's;
- head: `PartialFC` forward + backward; with `--dtype bf16|fp16` the centres stay fp32 and
  the head runs its GEMMs and logits in that dtype (`compute_dtype`, mixed precision), fed
  16-bit embeddings as a bf16/fp16 autocast backbone would;
- compiled (with --compiled): the head with `compiled=True` (its elementwise passes fused
  by torch.compile; the compile itself happens in the warm-up steps);
- fused (with --fused-update): the head stepping its centres a piece of classes at a time
  inside the backward (`PartialFC.update_in_backward`, plain SGD: w -= lr g), so it
  never holds the whole centre gradient that the head mode leaves in `weight.grad`; its
  time includes that update (one pass over the centres), which the floor does not do;
- reference (with --reference): the same head written plainly with autograd (normalised
  weight copy, full-matrix margin, distributed softmax through autograd all-reduces), the
  way the usual implementations do it.

Each rank times its step with a barrier before the clock starts; the step time reported is
the median over iterations of the slowest rank. Memory: peak resident set (CPU, minus
nothing: the whole process) or peak allocated CUDA memory (GPU).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from fr_trainer.devices import local_cuda_device, synchronize
from fr_trainer.distributed.collectives import all_gather_tensor, all_gather_with_grad
from fr_trainer.distributed.shard import ClassShard
from fr_trainer.distributed.spawn import run_ranks
from fr_trainer.heads.partial_fc import PartialFC
from fr_trainer.heads.sampling import num_sampled
from fr_trainer.margins import create_margin

DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class BenchConfig:
    world_size: int = 2
    batch: int = 128  # per rank
    dim: int = 512
    classes: int = 100_000
    sample_rate: float = 1.0
    margin: str = "arcface"
    chunk_size: int | None = None
    device: str = "cpu"
    threads: int = 1
    iters: int = 10
    warmup: int = 2
    dtype: str = "fp32"
    rounds: int = 1  # the modes run in turn this many times; medians across rounds
    logits_dtype: str | None = None  # mixed precision: the head's logit buffer (None: its default)
    compiled: bool = False  # also time the head with compiled elementwise passes (mode "compiled")
    fused_update: bool = False  # also time the head updating its centres in the backward (mode "fused")


@dataclass
class ModeResult:
    mode: str
    step_ms: float  # median over iterations of the slowest rank
    peak_mb: float  # max over ranks
    base_mb: float  # max over ranks, before the head's tensors existed


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _time_steps(step, cfg: BenchConfig, device: torch.device) -> list[float]:
    times = []
    for i in range(cfg.warmup + cfg.iters):
        dist.barrier()
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        if i >= cfg.warmup:
            times.append(time.perf_counter() - start)
    return times


def _inputs(cfg: BenchConfig, rank: int, device: torch.device):
    generator = torch.Generator().manual_seed(1234 + rank)
    dtype = DTYPES[cfg.dtype]
    x = torch.randn(cfg.batch, cfg.dim, generator=generator).to(device=device, dtype=dtype)
    y = torch.randint(0, cfg.classes, (cfg.batch,), generator=generator).to(device)
    return x, y


def floor_centre_rows(cfg: BenchConfig, rank: int) -> int:
    """The centre rows a rank's GEMMs run over: the shard's classes in use, times the
    margin's sub-centres per class."""
    shard = ClassShard(cfg.classes, cfg.world_size, rank)
    return num_sampled(shard.num_local, cfg.sample_rate) * create_margin(cfg.margin, num_classes=cfg.classes).subcenters


def _floor_step(cfg: BenchConfig, rank: int, device: torch.device):
    used = floor_centre_rows(cfg, rank)
    dtype = DTYPES[cfg.dtype]
    rows = cfg.batch * cfg.world_size
    x = torch.randn(rows, cfg.dim, device=device, dtype=dtype)
    w = torch.randn(used, cfg.dim, device=device, dtype=dtype)
    z = torch.randn(rows, used, device=device, dtype=dtype)  # outputs, touched before the clock
    grad_x = torch.randn(rows, cfg.dim, device=device, dtype=dtype)
    grad_w = torch.randn(used, cfg.dim, device=device, dtype=dtype)

    def step():
        torch.mm(x, w.t(), out=z)
        torch.mm(z, w, out=grad_x)
        torch.mm(z.t(), x, out=grad_w)

    return step


def _head_step(cfg: BenchConfig, rank: int, device: torch.device, compiled: bool = False,
               fused_update: bool = False):
    dtype = DTYPES[cfg.dtype]
    mixed = dtype in (torch.bfloat16, torch.float16)
    head = PartialFC(cfg.classes, cfg.dim, margin=cfg.margin, sample_rate=cfg.sample_rate,
                     chunk_size=cfg.chunk_size, seed=0, device=device,
                     compute_dtype=dtype if mixed else None,
                     logits_dtype=DTYPES[cfg.logits_dtype] if cfg.logits_dtype else None, compiled=compiled)
    if not mixed:
        head = head.to(dtype=dtype)
    if fused_update:  # (plain SGD written out: building a torch optimizer imports torch._dynamo, ~70 MB RSS)
        weight = head.weight.detach()

        def sgd_rows(start: int, end: int, grad_rows: torch.Tensor) -> None:
            weight[start:end].add_(grad_rows, alpha=-1e-3)

        head.update_in_backward(sgd_rows)
    x, y = _inputs(cfg, rank, device)
    x.requires_grad_()

    def step():
        head.weight.grad = None
        x.grad = None
        head(x, y).backward()

    return step


class _AllReduceSum(torch.autograd.Function):
    """All-reduce SUM whose backward is the identity (the loss is replicated)."""

    @staticmethod
    def forward(ctx, tensor):
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        return tensor

    @staticmethod
    def backward(ctx, grad):
        return grad


def _reference_step(cfg: BenchConfig, rank: int, device: torch.device):
    """The head as commonly written: autograd everywhere, a normalised weight copy,
    one-hot masks over the full logit matrix, arcface on the target via full-size ops."""
    head = PartialFC(cfg.classes, cfg.dim, seed=0, device=device).to(dtype=DTYPES[cfg.dtype])
    weight, shard = head.weight, head.shard
    x, y = _inputs(cfg, rank, device)
    x.requires_grad_()
    s, m = 64.0, 0.5

    def step():
        weight.grad = None
        x.grad = None
        xg = all_gather_with_grad(x, None)
        yg = all_gather_tensor(y, None)
        logits = F.linear(F.normalize(xg), F.normalize(weight)).clamp(-1, 1)
        local = yg - shard.start
        owned = (local >= 0) & (local < shard.num_local)
        onehot = torch.zeros_like(logits, dtype=torch.bool)
        onehot[owned.nonzero().squeeze(1), local[owned]] = True
        theta = torch.acos(logits.clamp(-1 + 1e-7, 1 - 1e-7))
        logits = torch.where(onehot, torch.cos(theta + m), logits) * s
        with torch.no_grad():
            row_max = logits.max(1, keepdim=True).values
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX)
        exp = torch.exp(logits - row_max)
        total = _AllReduceSum.apply(exp.sum(1, keepdim=True))
        prob = exp / total
        target = _AllReduceSum.apply((prob * onehot).sum(1))
        loss = -torch.log(target.clamp_min(1e-30)).mean()
        loss.backward()

    return step


def _compiled_step(cfg: BenchConfig, rank: int, device: torch.device):
    return _head_step(cfg, rank, device, compiled=True)


def _fused_step(cfg: BenchConfig, rank: int, device: torch.device):
    return _head_step(cfg, rank, device, fused_update=True)


_BUILDERS = {"floor": _floor_step, "head": _head_step, "compiled": _compiled_step, "fused": _fused_step,
             "reference": _reference_step}


def _run_mode(rank: int, world_size: int, mode: str, cfg: BenchConfig) -> dict:
    device = local_cuda_device(rank) if cfg.device == "cuda" else torch.device("cpu")
    base = _peak_mb(device)
    step = _BUILDERS[mode](cfg, rank, device)
    times = _time_steps(step, cfg, device)
    return {"times": times, "peak_mb": _peak_mb(device), "base_mb": base}


def _measure(cfg: BenchConfig, mode: str) -> ModeResult:
    backend = "nccl" if cfg.device == "cuda" else "gloo"
    per_rank = run_ranks(_run_mode, cfg.world_size, mode, cfg, backend=backend,
                         threads=cfg.threads, timeout_s=1800)
    slowest = [max(r["times"][i] for r in per_rank) for i in range(cfg.iters)]
    return ModeResult(mode, 1000 * statistics.median(slowest), max(r["peak_mb"] for r in per_rank),
                      max(r["base_mb"] for r in per_rank))


def run_benchmark(cfg: BenchConfig, modes: list[str]) -> list[ModeResult]:
    """Each mode on fresh ranks; with `cfg.rounds > 1` the modes alternate (floor, head,
    floor, head, ...) so that load drifting on a shared machine hits them alike, and the
    step time reported is the median over rounds."""
    rounds = [[_measure(cfg, mode) for mode in modes] for _ in range(max(1, cfg.rounds))]
    results = []
    for column, mode in enumerate(modes):
        runs = [round_results[column] for round_results in rounds]
        results.append(ModeResult(mode, statistics.median(r.step_ms for r in runs),
                                  max(r.peak_mb for r in runs), max(r.base_mb for r in runs)))
    return results


def format_table(cfg: BenchConfig, results: list[ModeResult]) -> str:
    floor = next(r for r in results if r.mode == "floor")
    lines = [
        f"PartialFC fwd+bwd: world {cfg.world_size} x {cfg.threads} thread(s) on {cfg.device}, "
        f"batch {cfg.batch}/rank, D {cfg.dim}, {cfg.classes} classes, sample_rate {cfg.sample_rate}, "
        f"{cfg.margin}, chunk {cfg.chunk_size}, {cfg.dtype}"
        + (f" (logits {cfg.logits_dtype})" if cfg.logits_dtype else "")
        + f", {cfg.iters} iters x {cfg.rounds} round(s)",
        f"{'mode':<10} {'step ms':>9} {'x floor':>8} {'peak MB':>9} {'x floor':>8} {'base MB':>8}",
    ]
    for r in results:
        lines.append(f"{r.mode:<10} {r.step_ms:9.1f} {r.step_ms / floor.step_ms:8.2f} "
                     f"{r.peak_mb:9.0f} {r.peak_mb / floor.peak_mb:8.2f} {r.base_mb:8.0f}")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> tuple[BenchConfig, bool, str | None]:
    parser = argparse.ArgumentParser(prog="fr-trainer bench head", description=__doc__.split("\n\n")[0])
    defaults = BenchConfig()
    parser.add_argument("--world-size", type=int, default=defaults.world_size)
    parser.add_argument("--batch", type=int, default=defaults.batch, help="per rank")
    parser.add_argument("--dim", type=int, default=defaults.dim)
    parser.add_argument("--classes", type=int, default=defaults.classes)
    parser.add_argument("--sample-rate", type=float, default=defaults.sample_rate)
    parser.add_argument("--margin", default=defaults.margin)
    parser.add_argument("--chunk-size", type=int, default=None)
    parser.add_argument("--device", choices=["cpu", "cuda"], default=defaults.device)
    parser.add_argument("--threads", type=int, default=defaults.threads, help="torch threads per rank")
    parser.add_argument("--iters", type=int, default=defaults.iters)
    parser.add_argument("--warmup", type=int, default=defaults.warmup)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=defaults.dtype)
    parser.add_argument("--logits-dtype", choices=sorted(DTYPES), default=None,
                        help="with --dtype bf16/fp16: the head's logit buffer (default: fp16 for fp16, fp32 for bf16)")
    parser.add_argument("--rounds", type=int, default=defaults.rounds,
                        help="run the modes in turn this many times (median across rounds)")
    parser.add_argument("--reference", action="store_true", help="also time a plain autograd head")
    parser.add_argument("--compiled", action="store_true",
                        help="also time the head with torch.compile'd elementwise passes")
    parser.add_argument("--fused-update", action="store_true",
                        help="also time the head stepping its centres in the backward")
    parser.add_argument("--json", default=None, help="write the results to this file")
    args = parser.parse_args(argv)
    cfg = BenchConfig(args.world_size, args.batch, args.dim, args.classes, args.sample_rate,
                      args.margin, args.chunk_size, args.device, args.threads, args.iters,
                      args.warmup, args.dtype, args.rounds, args.logits_dtype, args.compiled, args.fused_update)
    return cfg, args.reference, args.json


def main(argv: list[str] | None = None) -> int:
    cfg, reference, json_path = parse_args(list(sys.argv[1:] if argv is None else argv))
    if cfg.device == "cuda" and torch.cuda.device_count() < cfg.world_size:
        raise SystemExit(f"--device cuda needs {cfg.world_size} GPUs, found {torch.cuda.device_count()}")
    modes = (["floor", "head"] + (["compiled"] if cfg.compiled else []) + (["fused"] if cfg.fused_update else [])
             + (["reference"] if reference else []))
    results = run_benchmark(cfg, modes)
    print(format_table(cfg, results))
    if json_path:
        with open(json_path, "w") as handle:
            json.dump({"config": asdict(cfg), "results": [asdict(r) for r in results]}, handle, indent=2)
    return 0
