"""Measured peak memory of the head's tensors in real training steps, to check the planner.

Each case runs on `world_size` freshly spawned gloo ranks (CPU) or NCCL ranks (GPU). On
every rank the backbone's output `x [B, D]` and the labels are made first; then, from the
construction of `PartialFC` and its optimizer through `steps` training steps (zero_grad,
forward, backward, optional clipping, optimizer step; the second step is the first with
optimizer state), the peak of the bytes the head allocated is recorded:

- CPU: torch's profiler with `profile_memory=True` reports every allocation and free of
  the CPU allocator; the peak of their running sum is the head's peak (exact, and blind to
  the interpreter, gloo's own buffers and the allocator's caching);
- CUDA: `torch.cuda.max_memory_allocated()` minus the bytes allocated before.

The result is the maximum over ranks (rank 0 owns the most classes). `policy="cuda"` runs
the CPU head under the CUDA block policy (`fr_trainer.heads.device_policy`: whole-buffer
passes, no buffer pool), so that a CPU measures what the head allocates on a GPU.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from fr_trainer.devices import local_cuda_device
from fr_trainer.distributed.spawn import run_ranks
from fr_trainer.heads import buffer_pool

TORCH_DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Case:
    """One measured configuration (names as in `plan_head`)."""

    classes: int
    embedding_size: int = 128
    batch_per_rank: int = 32
    sample_rate: float = 1.0
    dtype: str = "fp32"
    optimizer: str = "sgd"
    margin: str = "arcface"
    chunk_size: int | None = None
    clip_grad: bool = False
    compute_dtype: str | None = None  # "bf16": 16-bit GEMMs on fp32 centres, bf16 embeddings
    fused_update: bool = False  # the centres stepped a piece at a time in the backward

    def plan_kwargs(self) -> dict:
        return asdict(self)


def _optimizer(case: Case, params):
    from fr_trainer.train.optim import SGD, AdamW

    if case.optimizer == "sgd":
        return SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)
    return AdamW(params, lr=1e-3, weight_decay=0.01)


def _train_steps(case: Case, rank: int, device: torch.device, x: torch.Tensor, y: torch.Tensor,
                 steps: int) -> None:
    from fr_trainer.heads import PartialFC
    from fr_trainer.train.grads import clip_global_norm

    compute = None if case.compute_dtype is None else TORCH_DTYPES[case.compute_dtype]
    head = PartialFC(case.classes, case.embedding_size, margin=case.margin,
                     sample_rate=case.sample_rate, chunk_size=case.chunk_size, seed=0, compute_dtype=compute)
    head = head.to(device=device, dtype=TORCH_DTYPES[case.dtype])
    optimizer = _optimizer(case, head.parameters())
    if case.fused_update:
        from fr_trainer.train.fused_update import attach_fused_update

        attach_fused_update(head, optimizer, loss_scaling=False)

    def micro_step() -> None:  # the loss (and the graph) dies on return, as in the trainer
        head(x, y).backward()

    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        x.grad = None
        micro_step()
        if case.clip_grad:
            clip_global_norm([], list(head.parameters()), 1e-3)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _cpu_peak(run) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return peak


def _cuda_peak(run, device: torch.device) -> int:
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    run()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def _warm_up_gemms(device: torch.device, dtypes: set[torch.dtype]) -> None:
    """One small GEMM forward and backward per dtype before any case: cuBLAS allocates its
    workspace at a stream's first GEMM and keeps it, and it belongs to no case (counted, it
    would inflate the first case measured and that one only)."""
    for dtype in sorted(dtypes, key=str):
        a = torch.ones(64, 64, device=device, dtype=dtype, requires_grad=True)
        (a @ a).float().sum().backward()
    torch.cuda.synchronize(device)


def _rank_peaks(rank: int, world_size: int, cases: list[Case], device_type: str, steps: int,
                policy: str | None = None) -> list[int]:
    if policy is not None:
        from fr_trainer.heads.device_policy import forced_policy

        with forced_policy(policy):
            return _rank_peaks(rank, world_size, cases, device_type, steps)
    device = local_cuda_device(rank) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        _warm_up_gemms(device, {TORCH_DTYPES[case.compute_dtype or case.dtype] for case in cases})
    peaks = []
    for case in cases:
        generator = torch.Generator().manual_seed(100 + rank)
        dtype = TORCH_DTYPES[case.compute_dtype or case.dtype]  # (a bf16 backbone's embeddings)
        x = torch.randn(case.batch_per_rank, case.embedding_size, generator=generator)
        x = x.to(device=device, dtype=dtype).requires_grad_()
        y = torch.randint(0, case.classes, (case.batch_per_rank,), generator=generator).to(device)

        def run(case=case, x=x, y=y) -> None:
            _train_steps(case, rank, device, x, y, steps)

        buffer_pool.clear()  # each case allocates its own buffers inside the measurement

        peaks.append(_cuda_peak(run, device) if device.type == "cuda" else _cpu_peak(run))
    return peaks


def measure_peaks(cases: list[Case], world_size: int = 2, device: str = "cpu", steps: int = 2,
                  timeout_s: float = 600.0, policy: str | None = None) -> list[int]:
    """Measured peak bytes of the head per case (max over ranks), in the order of `cases`;
    `policy`: the head's block policy (None: the device's own)."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and torch.cuda.device_count() < world_size:
        raise ValueError(f"world_size={world_size} needs as many GPUs, found "
                         f"{torch.cuda.device_count()}; lower --world-size")
    backend = "nccl" if device == "cuda" else "gloo"
    per_rank = run_ranks(_rank_peaks, world_size, list(cases), device, steps, policy, backend=backend,
                         timeout_s=timeout_s)
    return [max(rank[i] for rank in per_rank) for i in range(len(cases))]
