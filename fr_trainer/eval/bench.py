"""Evaluation benchmarks: verify embedding throughput and a full mini-IJB-C run.

    python -m fr_trainer.eval.bench [--backbone mobilefacenet] [--images 1024] [--out DIR]

1. Exports a small backbone (`fr_trainer.backbones.create_backbone`, random weights) to
   ONNX, and measures `embed_images` throughput with onnxruntime on CPU (flip on: two
   forward passes per image), after one warm-up batch.
2. Writes a synthetic data set with `fr_trainer.data.synthetic.generate` when that module
   is present (else `fr_trainer.eval.synthetic.make_mini_ijb` and a random `.bin`), then
   times `fr-trainer verify` on its `.bin` and a full `evaluate_ijb` (meta, align, embed,
   pooling, 1:1, 1:N, ROC PNG, scores) on its IJB-C tree.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np


def export_backbone(name: str, path: Path):
    """A randomly initialised registered backbone exported to ONNX (dynamic batch)."""
    import torch

    from fr_trainer.backbones import create_backbone
    from fr_trainer.eval.synthetic import export_onnx_simple

    torch.manual_seed(0)
    model = create_backbone(name).eval()
    return export_onnx_simple(model, path)


def bench_throughput(model_path: Path, num_images: int, batch_size: int, threads: int) -> dict:
    """images/s of embed_images (flip on and off) through onnxruntime on CPU."""
    from fr_trainer.eval.embedder import OnnxEmbedder, embed_images

    embedder = OnnxEmbedder(
        model_path,
        providers=["CPUExecutionProvider"],
        batch_size=2 * batch_size,
        num_threads=threads,
    )
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (num_images, 112, 112, 3), dtype=np.uint8)
    embed_images(embedder, images[:batch_size], batch_size)  # warm-up
    result = {}
    for flip in (True, False):
        start = time.perf_counter()
        embed_images(embedder, images, batch_size, flip=flip)
        seconds = time.perf_counter() - start
        result["flip" if flip else "no_flip"] = {
            "seconds": seconds,
            "images_per_second": num_images / seconds,
        }
    return result


def make_data(out: Path, num_subjects: int, num_pairs: int) -> dict:
    """A .bin and an IJB-C tree; returns {"bin": path, "ijb_root": path, "generator": str}."""
    try:
        from fr_trainer.data.synthetic import generate
    except ImportError:
        generate = None
    if generate is not None:
        start = time.perf_counter()
        generate(
            out,
            num_identities=2,
            images_per_identity=2,
            num_holdout_identities=100,
            num_pairs=num_pairs,
            val_sets=(("synth_val", 1.0),),
            num_ijbc_subjects=num_subjects,
        )
        return {
            "bin": out / "synth_val.bin",
            "ijb_root": out / "IJBC",
            "generator": "fr_trainer.data.synthetic",
            "generate_seconds": time.perf_counter() - start,
        }
    from fr_trainer.eval.binset import write_bin
    from fr_trainer.eval.synthetic import make_mini_ijb

    start = time.perf_counter()
    make_mini_ijb(out / "IJBC", num_subjects=num_subjects)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2 * num_pairs, 112, 112, 3), dtype=np.uint8)
    write_bin(out / "random.bin", images, rng.random(num_pairs) < 0.5)
    return {
        "bin": out / "random.bin",
        "ijb_root": out / "IJBC",
        "generator": "fr_trainer.eval.synthetic",
        "generate_seconds": time.perf_counter() - start,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fr_trainer.eval.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--backbone", default="mobilefacenet")
    parser.add_argument("--images", type=int, default=256, help="images for the throughput run")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--threads", type=int, default=0, help="onnxruntime intra-op threads (0 = default)"
    )
    parser.add_argument("--ijb-subjects", type=int, default=40)
    parser.add_argument("--pairs", type=int, default=300, help="pairs of the .bin")
    parser.add_argument("--out", type=Path, default=None, help="work dir (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    from fr_trainer.eval.embedder import OnnxEmbedder
    from fr_trainer.eval.ijb import evaluate_ijb, to_jsonable
    from fr_trainer.eval.verification import verify_bin

    with tempfile.TemporaryDirectory() as tmp:
        work = args.out or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        report: dict = {
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
            "backbone": args.backbone,
            "batch_size": args.batch_size,
        }
        model = export_backbone(args.backbone, work / f"{args.backbone}.onnx")
        report["throughput"] = bench_throughput(model, args.images, args.batch_size, args.threads)
        print("embedding throughput:", json.dumps(report["throughput"]), flush=True)
        data = make_data(work / "data", args.ijb_subjects, args.pairs)
        report["data"] = {k: str(v) for k, v in data.items()}
        embedder = OnnxEmbedder(
            model,
            providers=["CPUExecutionProvider"],
            batch_size=2 * args.batch_size,
            num_threads=args.threads,
        )
        start = time.perf_counter()
        verify = verify_bin(embedder, data["bin"], batch_size=args.batch_size)
        report["verify"] = {
            "seconds": time.perf_counter() - start,
            "num_pairs": verify["num_pairs"],
            "embed_images_per_second": verify["images_per_second"],
        }
        print("verify:", json.dumps(report["verify"]), flush=True)
        ijb = evaluate_ijb(
            embedder, data["ijb_root"], "IJBC", out_dir=work / "ijb_out", batch_size=args.batch_size
        )
        report["ijb"] = {k: ijb[k] for k in ("num_images", "num_templates", "num_pairs", "seconds")}
        print("ijb:", json.dumps(to_jsonable(report["ijb"])), flush=True)
    if args.json:
        args.json.write_text(json.dumps(to_jsonable(report), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
