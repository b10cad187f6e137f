"""`fr-trainer plan`: per-GPU memory of the head and collective volume per step.

    fr-trainer plan --classes 10M --world-size 64                # one plan
    fr-trainer plan --classes 10M 30M --gpu-memory 80GB          # how many GPUs
    fr-trainer plan --classes 10M 100M --gpu-memory 80GB --sample-rate 0.1
    fr-trainer plan --classes 20000 --dim 64 --batch 256 --world-size 2 --measure   # check

Sizes are decimal (1 GB = 1e9 bytes). The figures are the head only (centres, optimizer
state, logits, gathered features, gradients, temporaries); give the backbone's share with
`--reserve` (e.g. 20GB for an iresnet100 at batch 128 under AMP).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict

from fr_trainer.plan.model import (
    DTYPE_BYTES,
    OPTIMIZERS,
    HeadPlan,
    gpus_needed,
    parse_bytes,
    parse_count,
    plan_head,
)

GB = 1e9
COMPONENTS = ("weights", "optimizer_state", "logits", "weight_grad", "features", "workspace",
              "optimizer_temp", "clip_temp")


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number > 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fr-trainer plan", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--classes", nargs="+", required=True, type=parse_count, help="identities: 93431, 10M, 100M")
    p.add_argument("--dim", type=int, default=512, help="embedding size D (default 512)")
    p.add_argument("--batch", type=int, default=128, help="batch per GPU (default 128)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--world-size", type=int, help="number of GPUs (default 8)")
    size.add_argument("--gpu-memory", type=parse_bytes, help="memory per GPU, e.g. 80GB: find the fewest GPUs")
    p.add_argument("--reserve", type=parse_bytes, default=0, help="per-GPU memory kept for the backbone (e.g. 20GB)")
    p.add_argument("--sample-rate", type=float, default=1.0)
    p.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="fp32")
    p.add_argument("--compute-dtype", choices=["bf16"], default=None,
                   help="the head's GEMMs in bf16 on fp32 centres (PartialFC(compute_dtype=torch.bfloat16))")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd")
    p.add_argument("--margin", default="arcface")
    p.add_argument("--chunk-size", type=int, default=None, help="classes per logit block")
    p.add_argument("--no-momentum", action="store_true", help="SGD without momentum (no state)")
    p.add_argument("--no-weight-decay", action="store_true")
    p.add_argument("--nesterov", action="store_true")
    p.add_argument("--clip-grad", action="store_true", help="count the trainer's global-norm clipping")
    p.add_argument("--fused-update", action="store_true",
                   help="head.fused_update: the centres stepped a piece at a time in the backward")
    p.add_argument("--backend", choices=["nccl", "gloo"], default="nccl")
    p.add_argument("--tflops", type=positive_float, default=None, help="sustained GEMM TFLOP/s, for a time estimate")
    p.add_argument("--net-gbps", type=positive_float, default=None, help="per-GPU network GB/s, for a time estimate")
    p.add_argument("--measure", action="store_true",
                   help="also run the configuration on --world-size CPU ranks and print the measured peak")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="for --measure")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def _plan_kwargs(args: argparse.Namespace) -> dict:
    return {"embedding_size": args.dim, "batch_per_rank": args.batch, "sample_rate": args.sample_rate,
                "dtype": args.dtype, "optimizer": args.optimizer, "margin": args.margin,
                "chunk_size": args.chunk_size, "momentum": not args.no_momentum,
                "weight_decay": not args.no_weight_decay, "nesterov": args.nesterov,
                "clip_grad": args.clip_grad, "backend": args.backend, "compute_dtype": args.compute_dtype,
                "fused_update": args.fused_update}


def make_plans(args: argparse.Namespace) -> list[HeadPlan]:
    kwargs = _plan_kwargs(args)
    if args.gpu_memory is not None:
        budget = args.gpu_memory - args.reserve
        return [gpus_needed(classes, budget, **kwargs) for classes in args.classes]
    world_size = 8 if args.world_size is None else args.world_size  # 0 is an error, not the default
    return [plan_head(classes, world_size=world_size, **kwargs) for classes in args.classes]


def _gb(value: float) -> str:
    return f"{value / GB:.3f}" if value < 10 * GB else f"{value / GB:.1f}"


def format_plans(plans: list[HeadPlan], args: argparse.Namespace) -> str:
    first = plans[0]
    lines = [(f"PartialFC head per GPU: D {first.embedding_size}, batch {first.batch_per_rank}/GPU, "
             f"sample_rate {first.sample_rate}, {first.dtype}"
             f"{' centres, bf16 GEMMs' if first.compute_dtype else ''}, {first.optimizer}, {first.margin}, "
             f"chunk {first.chunk_size}{', clipping' if args.clip_grad else ''}"
             f"{', fused update' if first.fused_update else ''} (GB = 1e9 bytes)")]
    if args.gpu_memory is not None:
        lines.append(f"budget {_gb(args.gpu_memory)} GB per GPU - reserve {_gb(args.reserve)} GB "
                     f"= {_gb(args.gpu_memory - args.reserve)} GB for the head")
    header = ["classes", "GPUs", "classes/GPU", "used/step"] + list(COMPONENTS) + ["peak GB", "phase",
                                                                                  "comm MB/step"]
    rows = []
    for p in plans:
        rows.append([f"{p.classes:,}", str(p.world_size), f"{p.classes_per_rank:,}", f"{p.classes_used:,}"]
                    + [_gb(getattr(p, c)) for c in COMPONENTS]
                    + [_gb(p.peak), p.peak_phase, f"{p.collective_traffic / 1e6:.1f}"])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines.append("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in rows]
    lines.append("peak = weights + optimizer_state + max(logits + weight_grad + features + workspace, "
                 "weight_grad + optimizer_temp + pooled, weight_grad + clip_temp + pooled)"
                 + (f"; pooled = {_gb(plans[-1].pooled)} GB: the CPU head's buffer pool keeps its logits between steps"
                    if plans[-1].pooled else ""))
    lines.append(_collective_table(plans[-1]))
    estimate = _time_estimate(plans, args)
    if estimate:
        lines.append(estimate)
    return "\n".join(lines)


def _collective_table(plan: HeadPlan) -> str:
    if not plan.collectives:
        return "collectives: none (one GPU)"
    lines = [(f"collectives per step at {plan.classes:,} classes on {plan.world_size} GPUs "
             "(payload = result size; traffic = bytes each GPU sends with ring algorithms):")]
    for c in plan.collectives:
        sizes = f"payload {c.payload / 1e6:10.3f} MB  traffic {c.traffic / 1e6:10.3f} MB"
        lines.append(f"  {c.name:<24} {c.op:<15} {sizes}")
    return "\n".join(lines)


def _time_estimate(plans: list[HeadPlan], args: argparse.Namespace) -> str | None:
    if args.tflops is None and args.net_gbps is None:
        return None
    parts = []
    for p in plans:
        compute = p.gemm_flops / (args.tflops * 1e12) * 1e3 if args.tflops else None
        comm = p.collective_traffic / (args.net_gbps * 1e9) * 1e3 if args.net_gbps else None
        bits = [f"GEMMs {compute:.2f} ms" if compute is not None else "",
                f"collectives {comm:.2f} ms" if comm is not None else ""]
        parts.append(f"  {p.classes:,} classes on {p.world_size} GPUs: " + ", ".join(b for b in bits if b))
    return "head time per step, lower bound (no overlap counted):\n" + "\n".join(parts)


def _measure(plans: list[HeadPlan], args: argparse.Namespace) -> str:
    from fr_trainer.plan.measure import Case, measure_peaks

    cases = [Case(p.classes, p.embedding_size, p.batch_per_rank, p.sample_rate, p.dtype, p.optimizer,
                  p.margin, p.chunk_size, args.clip_grad, p.compute_dtype, p.fused_update) for p in plans]
    # a GPU plan measured on CPU ranks: the head under the CUDA block policy, as on a GPU
    policy = "cuda" if args.device == "cpu" and args.backend == "nccl" else None
    measured = measure_peaks(cases, world_size=plans[0].world_size, device=args.device, policy=policy)
    how = " under the CUDA block policy (whole-buffer passes, as on a GPU)" if policy else ""
    lines = [f"measured on {plans[0].world_size} {args.device} rank(s){how}, 2 steps (MB = 2**20 bytes):"]
    for p, m in zip(plans, measured):
        lines.append(f"  {p.classes:,} classes: planned {p.peak / 2**20:.2f} MB, measured {m / 2**20:.2f} MB, "
                     f"planned/measured {p.peak / m:.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.measure and args.gpu_memory is not None:
        print("fr-trainer plan: error: --measure runs a given --world-size; drop --gpu-memory", file=sys.stderr)
        return 2
    try:
        plans = make_plans(args)
    except ValueError as error:
        print(f"fr-trainer plan: error: {error}", file=sys.stderr)
        return 2
    if args.json:
        out = [dict(asdict(p), peak=p.peak, peak_phase=p.peak_phase,
                    collective_traffic=p.collective_traffic) for p in plans]
        print(json.dumps(out, indent=2))
    else:
        print(format_plans(plans, args))
    if args.measure:
        print(_measure(plans, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
