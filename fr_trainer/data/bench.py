"""`fr-trainer bench data`: throughput of synthesis, packing, the torch loader and DALI (CPU).

On the synthetic set (generated into a temporary folder unless `--root` names one):
- synth: images rendered per second with `--workers` processes;
- pack: images per second packing the training images (exported as a class-per-folder
  tree first, not timed) with `--workers` processes;
- torch: decoded, flipped, normalised 112x112 images per second through `build_loader`
  (Pillow in `W` DataLoader workers), for W = 1 and W = `--workers`;
- dali: the same through `DaliLoader` on the CPU with `num_threads` = 1 and `--workers`.
"Per core" divides by W. The first batch (start-up) is not timed. Each row also gives
images per CPU-second (user + system time of this process and its reaped workers, start-up
included), which stays meaningful on a machine shared with other jobs.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import torch


def cpu_seconds() -> float:
    """User + system CPU time of this process (all threads) and its reaped children."""
    own, children = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _images_per_second(batches: Iterable, limit: int) -> tuple[float, int]:
    """Consume batches (images first); time all but the first; -> (images/s, images timed)."""
    iterator = iter(batches)
    first = next(iterator)
    del first
    count, start = 0, time.perf_counter()
    for images, _ in iterator:
        count += int(images.shape[0])
        if count >= limit:
            break
    elapsed = time.perf_counter() - start
    del iterator  # shuts DataLoader workers down, so their CPU time is counted
    gc.collect()
    return (count / elapsed if elapsed > 0 else 0.0), count


def _with_cpu(run, *args) -> dict:
    """Run a benchmark and add `cpu_s` and `images_per_cpu_s` (all images, start-up included)."""
    before = cpu_seconds()
    row = run(*args)
    row["cpu_s"] = cpu_seconds() - before
    total = row.get("total_images", row["images"])
    row["images_per_cpu_s"] = total / row["cpu_s"] if row["cpu_s"] > 0 else 0.0
    return row


def bench_torch(rec: Path, workers: int, batch_size: int, limit: int) -> dict:
    from fr_trainer.data.dataset import RecordDataset
    from fr_trainer.data.loader import build_loader

    dataset = RecordDataset(rec)
    loader = build_loader(dataset, batch_size=batch_size, num_workers=workers, decode="pil")
    rate, count = _images_per_second(loader, limit)
    return {
        "pipeline": "torch",
        "workers": workers,
        "images_per_s": rate,
        "per_core": rate / max(workers, 1),
        "images": count,
        "total_images": count + batch_size,
    }


def bench_dali(rec: Path, threads: int, batch_size: int, limit: int) -> dict:
    from fr_trainer.data.dali import DaliLoader

    loader = DaliLoader(
        rec, batch_size=batch_size, num_threads=threads, device="cpu", initial_fill=batch_size
    )
    rate, count = _images_per_second(loader, limit)
    del loader
    gc.collect()
    return {
        "pipeline": "dali-cpu",
        "workers": threads,
        "images_per_s": rate,
        "per_core": rate / max(threads, 1),
        "images": count,
        "total_images": count + batch_size,
    }


def export_tree(rec: Path, out: Path, limit: int) -> int:
    """Write up to `limit` training images as out/<class>/<key>.jpg; returns the count."""
    from fr_trainer.data.layout import read_layout
    from fr_trainer.data.recordio import RecordReader, unpack

    reader = RecordReader(rec, rec.with_suffix(".idx"))
    layout = read_layout(reader)
    count = 0
    for key in layout.image_keys[:limit]:
        header, data = unpack(reader.read(int(key)))
        folder = out / f"{int(header.label):06d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{int(key)}.jpg").write_bytes(data)
        count += 1
    return count


def bench_pack(rec: Path, workers: int, limit: int, scratch: Path) -> dict:
    from fr_trainer.data.pack import pack_image_folder

    tree = scratch / f"tree{workers}"
    count = export_tree(rec, tree, limit)
    before = cpu_seconds()
    summary = pack_image_folder(tree, scratch / f"packed{workers}", workers=workers, progress=False)
    cpu = cpu_seconds() - before
    return {
        "pipeline": "pack",
        "workers": workers,
        "images_per_s": summary.images_per_second,
        "per_core": summary.images_per_second / max(workers, 1),
        "images": count,
        "cpu_s": cpu,
        "images_per_cpu_s": count / cpu if cpu > 0 else 0.0,
    }


def bench_synth(out: Path, workers: int, identities: int, per_identity: int) -> dict:
    from fr_trainer.data.synthetic import generate

    summary = generate(
        out, num_identities=identities, images_per_identity=per_identity, workers=workers
    )
    rate = summary.images_per_second
    return {
        "pipeline": "synth",
        "workers": workers,
        "images_per_s": rate,
        "per_core": rate / max(workers, 1),
        "images": summary.images_rendered,
        "seconds": summary.seconds,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fr-trainer bench data", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--root", default=None, help="folder with train.rec/.idx (default: synthesise one)"
    )
    parser.add_argument("--identities", type=int, default=300)
    parser.add_argument("--images-per-identity", type=int, default=20)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--max-images", type=int, default=6000, help="images timed per loader run")
    parser.add_argument(
        "--pipelines", default="synth,pack,torch,dali", help="comma-separated subset"
    )
    parser.add_argument("--json", default=None, help="also write the results here")
    return parser


def _table(rows: list[dict]) -> str:
    lines = [
        "| pipeline | workers | images/s | images/s per core | images per CPU-second | images |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['pipeline']} | {r['workers']} | {r['images_per_s']:.0f} | {r['per_core']:.0f} | "
        f"{r.get('images_per_cpu_s', 0):.0f} | {r['images']} |"
        for r in rows
    ]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    wanted = {name.strip() for name in args.pipelines.split(",") if name.strip()}
    torch.set_num_threads(1)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="fr_bench_data_") as scratch_name:
        scratch = Path(scratch_name)
        if args.root is None:
            root = scratch / "synth"
            row = _with_cpu(
                bench_synth, root, args.workers, args.identities, args.images_per_identity
            )
            if "synth" in wanted:
                rows.append(row)
        else:
            root = Path(args.root)
        rec = root / "train.rec"
        counts = sorted({1, args.workers})
        for workers in counts:
            if "pack" in wanted:
                rows.append(bench_pack(rec, workers, args.max_images, scratch))
            if "torch" in wanted:
                rows.append(_with_cpu(bench_torch, rec, workers, args.batch_size, args.max_images))
            if "dali" in wanted:
                try:
                    rows.append(
                        _with_cpu(bench_dali, rec, workers, args.batch_size, args.max_images)
                    )
                except ImportError as error:
                    print(f"dali skipped: {error}")
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    )
    print(_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0
