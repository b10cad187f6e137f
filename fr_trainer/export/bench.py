"""Export benchmark: per backbone, ONNX size, parity, onnxruntime CPU latency at batch 1
and 7, and torch eager CPU latency for comparison.

    python -m fr_trainer.export.bench [--backbones iresnet50 mobilefacenet] [--runs 10]
        [--threads N] [--fp16] [--json OUT.json]

Models are randomly initialised (latency and size do not depend on the weights); their
BatchNorm statistics are set from one batch so the parity figures are meaningful. Prints a
markdown table; latency is the median of --runs timed runs after one warm-up.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

BATCHES = (1, 7)
TOO_LARGE = ("vit_h",)


def parse_args(argv: list[str]) -> argparse.Namespace:
    from fr_trainer.backbones import list_backbones

    p = argparse.ArgumentParser(prog="python -m fr_trainer.export.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # vit_h's fp32 file would pass protobuf's 2 GB limit: name it explicitly to try
    default = [name for name in list_backbones() if name not in TOO_LARGE]
    p.add_argument("--backbones", nargs="+", default=default, metavar="NAME")
    p.add_argument("--runs", type=int, default=10, help="timed runs per batch size")
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op threads for torch and onnxruntime (default: library default)")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--fp16", action="store_true", help="fp16 weights in the ONNX file")
    p.add_argument("--json", metavar="OUT.json", help="also write the rows as JSON")
    return p.parse_args(argv)


def torch_latency_ms(model: torch.nn.Module, batch: int, runs: int) -> float:
    from fr_trainer.export import random_face_batch

    x = random_face_batch(batch, seed=1)
    times = []
    with torch.inference_mode():
        model(x)
        for _ in range(runs):
            t = time.perf_counter()
            model(x)
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def bench_one(name: str, args: argparse.Namespace, workdir: Path) -> dict:
    from fr_trainer.backbones import count_macs, create_backbone, recalibrate_batchnorm
    from fr_trainer.export import export_onnx_with_report, random_face_batch

    torch.manual_seed(0)
    model = create_backbone(name)
    recalibrate_batchnorm(model, [random_face_batch(8, seed=3)])
    model.eval()
    t = time.perf_counter()
    report = export_onnx_with_report(model, workdir / f"{name}.onnx", opset=args.opset,
                                     fp16=args.fp16, latency_runs=args.runs,
                                     num_threads=args.threads)
    export_s = time.perf_counter() - t
    row = {
        "backbone": name,
        "params_m": report.num_parameters / 1e6,
        "gmacs": count_macs(model) / 1e9,
        "onnx_mib": report.size_bytes / 2**20,
        "max_rel_diff": report.max_relative_diff,
        "min_cosine": report.min_cosine,
        "export_s": export_s,
    }
    for b in BATCHES:
        row[f"ort_ms_b{b}"] = report.latency_ms[b]
        row[f"torch_ms_b{b}"] = torch_latency_ms(model, b, args.runs)
    (workdir / f"{name}.onnx").unlink()
    return row


def markdown(rows: list[dict]) -> str:
    head = ("| backbone | params | GMACs | ONNX size | max rel. diff | ORT b1 (ms) | ORT b7 (ms) "
            "| torch b1 (ms) | torch b7 (ms) | export (s) |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['backbone']} | {r['params_m']:.2f}M | {r['gmacs']:.2f} | {r['onnx_mib']:.1f} MiB "
            f"| {r['max_rel_diff']:.1e} | {r['ort_ms_b1']:.1f} | {r['ort_ms_b7']:.1f} "
            f"| {r['torch_ms_b1']:.1f} | {r['torch_ms_b7']:.1f} | {r['export_s']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.threads:
        torch.set_num_threads(args.threads)
    import onnxruntime

    print(f"# torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, "
          f"{platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}, "
          f"opset {args.opset}, {'fp16' if args.fp16 else 'fp32'} weights, "
          f"median of {args.runs} runs", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.backbones:
            rows.append(bench_one(name, args, Path(tmp)))
            print(f"# {name} done", file=sys.stderr, flush=True)
    print(markdown(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
