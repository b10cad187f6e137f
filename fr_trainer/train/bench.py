"""`fr-trainer bench train`: samples/s of a full training step, and where the time goes.

One step = next batch (data) + backbone forward + head forward/backward (PartialFC,
all-gather and distributed softmax included) + backbone backward (DDP all-reduce
included) + optimizer step. The split is measured by cutting the graph at the
embeddings: the head is run on detached embeddings, their gradient is then pushed
through the backbone, which is exactly what the joint backward computes.

    fr-trainer bench train --backbone mobilefacenet --batch-size 64 --world-size 2
    fr-trainer bench train --data data/synth --num-workers 2      # real decode in the loop
    fr-trainer bench train --data data/synth --loader torch,dali  # compare the loaders

With `--data`, each loader is also run alone first (`--data-batches` batches, no model):
images per CPU-second of the data path, CPU time being user + system of the rank
process(es), their DataLoader workers and DALI's threads (resource; live workers via
psutil when it is installed), with and without the start-up (first batch, DALI import).
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import time

import torch

from fr_trainer.devices import local_cuda_device, synchronize


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fr-trainer bench train", description=__doc__.split("\n")[0])
    p.add_argument("--backbone", default="mobilefacenet")
    p.add_argument("--embedding-size", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=64, help="per rank")
    p.add_argument("--world-size", type=int, default=1, help="ranks (spawned gloo/NCCL processes)")
    p.add_argument("--num-classes", type=int, default=10000)
    p.add_argument("--sample-rate", type=float, default=1.0)
    p.add_argument("--margin", default="arcface")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "fp16", "bf16"))
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (CPU)")
    p.add_argument(
        "--data", default=None, help="a data root with train.rec (default: random images)"
    )
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument(
        "--loader", default="torch", help="with --data: torch, dali, or a comma list to compare"
    )
    p.add_argument("--dali-threads", type=int, default=1, help="DALI decode threads per rank")
    p.add_argument(
        "--data-batches", type=int, default=100, help="batches of the data-only pass (0: none)"
    )
    p.add_argument("--head-dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="the head's GEMM/logit dtype (auto: the autocast dtype), as head.dtype")
    p.add_argument("--channels-last", default="auto", choices=("auto", "on", "off"),
                   help="NHWC backbone and images, as model.channels_last (auto: on CUDA)")
    p.add_argument("--compile", action="store_true", help="torch.compile the backbone, as model.compile")
    p.add_argument("--json", default=None, help="also write the result here")
    return p


def process_cpu_seconds() -> float:
    """User + system CPU of this process (all threads), its reaped children and, when psutil
    is installed, its live children (DataLoader workers)."""
    own, reaped = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    total = own.ru_utime + own.ru_stime + reaped.ru_utime + reaped.ru_stime
    try:
        import psutil
    except ImportError:
        return total
    for child in psutil.Process().children(recursive=True):
        try:
            times = child.cpu_times()
        except psutil.Error:  # exited meanwhile: counted once reaped
            continue
        total += times.user + times.system
    return total


def _stream(args, rank: int, world_size: int, device: torch.device):
    from fr_trainer.train.config import config_from_dict
    from fr_trainer.train.data_setup import BatchStream, build_train_data, open_dataset

    cfg = config_from_dict(
        {
            "data": {
                "root": args.data,
                "batch_size": args.batch_size,
                "num_workers": args.num_workers,
                "loader": args.loader,
                "dali_threads": args.dali_threads,
            }
        }
    )
    dataset = open_dataset(cfg)
    return BatchStream(build_train_data(cfg, dataset, rank, world_size, device), world_size), dataset


def data_pass(args, rank: int, world_size: int, device: torch.device) -> dict:
    """The loader alone: CPU-seconds for the first batch (start-up) + `--data-batches`."""
    start = process_cpu_seconds()
    stream, _ = _stream(args, rank, world_size, device)
    first = stream.next()[1].numel()
    steady_start, wall = process_cpu_seconds(), time.perf_counter()
    images = 0
    for _ in range(args.data_batches):
        images += stream.next()[1].numel()
    synchronize(device)  # (the last batch's copies, flips and normalisation, queued on the device)
    steady, wall = process_cpu_seconds() - steady_start, time.perf_counter() - wall
    del stream  # ends the epoch's iterator: DataLoader workers exit and are reaped
    gc.collect()
    return {
        "images": first + images,
        "cpu_s": process_cpu_seconds() - start,
        "steady_images": images,
        "steady_cpu_s": steady,
        "steady_wall_s": wall,
    }


def _batches(args, rank: int, world_size: int, device: torch.device):
    if args.data:
        stream, dataset = _stream(args, rank, world_size, device)
        return stream.next, dataset.num_classes
    generator = torch.Generator().manual_seed(rank)
    images = torch.randn(args.batch_size, 3, 112, 112, generator=generator).to(device)
    labels = torch.randint(0, args.num_classes, (args.batch_size,), generator=generator).to(device)
    return (lambda: (images, labels)), args.num_classes


def bench_rank(rank: int, world_size: int, args: argparse.Namespace) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    from fr_trainer.backbones import create_backbone
    from fr_trainer.heads import PartialFC
    from fr_trainer.heads.precision import resolve_head_dtype
    from fr_trainer.train.grads import scale_backbone_grad
    from fr_trainer.train.optim import SGD
    from fr_trainer.train.runtime import (
        configure_backends,
        resolve_device,
        resolve_precision,
        use_channels_last,
    )

    torch.set_num_threads(args.threads)
    device_type = resolve_device(args.device)
    device = local_cuda_device(rank) if device_type == "cuda" else torch.device("cpu")
    precision = resolve_precision(args.precision, device_type)
    data_only = data_pass(args, rank, world_size, device) if args.data and args.data_batches else None
    next_batch, num_classes = _batches(args, rank, world_size, device)
    torch.manual_seed(0)
    configure_backends(device, deterministic=False)
    backbone = create_backbone(args.backbone, embedding_size=args.embedding_size).to(device)
    channels_last = use_channels_last(args.channels_last, backbone, device)
    if channels_last:
        backbone.to(memory_format=torch.channels_last)
    if args.compile:
        backbone.compile()
    model = DistributedDataParallel(backbone) if world_size > 1 else backbone
    head = PartialFC(
        num_classes, args.embedding_size, margin=args.margin, sample_rate=args.sample_rate, seed=0,
        compute_dtype=resolve_head_dtype(args.head_dtype, precision.autocast_dtype), device=device,
    )
    optimizer = SGD(
        [{"params": list(backbone.parameters())}, {"params": list(head.parameters())}],
        lr=0.01,
        momentum=0.9,
        weight_decay=5e-4,
    )
    scaler = torch.amp.GradScaler(device_type) if precision.scaler else None
    parts = {"data": 0.0, "backbone": 0.0, "head": 0.0, "optimizer": 0.0}
    total_start = None
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            parts = {k: 0.0 for k in parts}
            synchronize(device)
            total_start, cpu_start = time.perf_counter(), process_cpu_seconds()
        t0 = time.perf_counter()
        images, labels = next_batch()
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        synchronize(device)
        t1 = time.perf_counter()
        with precision.autocast(device):
            embeddings = model(images)
        synchronize(device)
        t2 = time.perf_counter()
        features = embeddings.detach().float().requires_grad_()
        loss = head(features, labels)
        (scaler.scale(loss) if scaler else loss).backward()
        synchronize(device)
        t3 = time.perf_counter()
        scale_backbone_grad(embeddings, world_size).backward(features.grad.to(embeddings.dtype))
        synchronize(device)
        t4 = time.perf_counter()
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        t5 = time.perf_counter()
        for name, seconds in (
            ("data", t1 - t0),
            ("backbone", (t2 - t1) + (t4 - t3)),
            ("head", t3 - t2),
            ("optimizer", t5 - t4),
        ):
            parts[name] += seconds
    total = time.perf_counter() - total_start
    return {
        "seconds": total,
        "cpu_s": process_cpu_seconds() - cpu_start,
        "data_only": data_only,
        "parts": parts,
        "loss": float(loss.detach()),
        "num_classes": num_classes,
        "channels_last": channels_last,
        "compiled": bool(args.compile),
        "head_dtype": str(head.compute_dtype or head.weight.dtype).removeprefix("torch."),
    }


def _run(args: argparse.Namespace) -> list[dict]:
    if args.world_size == 1:
        return [bench_rank(0, 1, args)]
    from fr_trainer.distributed.spawn import run_ranks

    backend = (
        "nccl"
        if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
        else "gloo"
    )
    return run_ranks(
        bench_rank, args.world_size, args, backend=backend, threads=args.threads, timeout_s=3600
    )


def _summary(args: argparse.Namespace, results: list[dict]) -> dict:
    seconds = max(r["seconds"] for r in results)
    samples = args.steps * args.batch_size * args.world_size
    parts = {k: sum(r["parts"][k] for r in results) / len(results) for k in results[0]["parts"]}
    share = {k: v / sum(parts.values()) for k, v in parts.items()}
    cpu = sum(r["cpu_s"] for r in results)
    out = {
        "backbone": args.backbone,
        "batch_size": args.batch_size,
        "world_size": args.world_size,
        "num_classes": results[0]["num_classes"],
        "sample_rate": args.sample_rate,
        "device": args.device,
        "precision": args.precision,
        "threads_per_rank": args.threads,
        "head_dtype": results[0]["head_dtype"],
        "channels_last": results[0]["channels_last"],
        "compiled": results[0]["compiled"],
        "data": args.data or "random tensors",
        "loader": args.loader if args.data else None,
        "num_workers": args.num_workers if args.data else None,
        "dali_threads": args.dali_threads if args.data and args.loader == "dali" else None,
        "samples_per_s": samples / seconds,
        "step_ms": 1000 * seconds / args.steps,
        "step_cpu_s": cpu,
        "step_images_per_cpu_s": samples / cpu if cpu > 0 else 0.0,
        "share": share,
    }
    passes = [r["data_only"] for r in results if r.get("data_only")]
    if passes:
        images, cpu = sum(p["images"] for p in passes), sum(p["cpu_s"] for p in passes)
        steady, steady_cpu = sum(p["steady_images"] for p in passes), sum(p["steady_cpu_s"] for p in passes)
        out["data_only"] = {
            "images": images,
            "cpu_s": cpu,
            "images_per_cpu_s": images / cpu if cpu > 0 else 0.0,
            "steady_images_per_cpu_s": steady / steady_cpu if steady_cpu > 0 else 0.0,
            "steady_images_per_s": steady / max(p["steady_wall_s"] for p in passes),
        }
    return out


def _line(out: dict) -> str:
    loader = f" [{out['loader']} loader]" if out["loader"] else ""
    line = (
        f"{out['backbone']} batch {out['batch_size']} x {out['world_size']} rank(s), {out['num_classes']} classes "
        f"(sample_rate {out['sample_rate']}), head {out['head_dtype']}"
        + (", channels_last" if out["channels_last"] else "") + (", compiled" if out["compiled"] else "")
        + f", {out['data']}{loader}: {out['samples_per_s']:.1f} samples/s, "
        f"{out['step_ms']:.0f} ms/step, {out['step_images_per_cpu_s']:.1f} images per CPU-second; time share: "
        + ", ".join(f"{k} {v * 100:.0f}%" for k, v in out["share"].items())
    )
    if "data_only" in out:
        d = out["data_only"]
        line += (
            f"\n  data only: {d['images_per_cpu_s']:.0f} images per CPU-second with start-up "
            f"({d['images']} images, {d['cpu_s']:.2f} CPU-s), {d['steady_images_per_cpu_s']:.0f} steady, "
            f"{d['steady_images_per_s']:.0f} images/s"
        )
    return line


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    loaders = [name.strip() for name in args.loader.split(",") if name.strip()] or ["torch"]
    unknown = [name for name in loaders if name not in ("torch", "dali")]
    if unknown:
        raise SystemExit(f"--loader {args.loader!r}: {unknown[0]!r} is not torch or dali")
    if args.world_size > 1 and args.data and args.num_workers:
        # spawned ranks are daemonic and cannot start DataLoader workers
        print(
            f"note: --world-size {args.world_size} with --data decodes in the rank processes "
            "(--num-workers 0); the data share is then the full decode cost"
        )
        args.num_workers = 0
    outs = []
    for name in loaders:
        run_args = argparse.Namespace(**{**vars(args), "loader": name})
        out = _summary(run_args, _run(run_args))
        print(_line(out))
        outs.append(out)
    result: dict = outs[0]
    if len(outs) > 1:
        by = {o["loader"]: o for o in outs}
        result = {"runs": outs}
        if "torch" in by and "dali" in by:
            ratios = {
                "step_images_per_cpu_s": by["dali"]["step_images_per_cpu_s"]
                / by["torch"]["step_images_per_cpu_s"]
            }
            if "data_only" in by["dali"]:
                for key in ("images_per_cpu_s", "steady_images_per_cpu_s"):
                    ratios[f"data_only_{key}"] = by["dali"]["data_only"][key] / by["torch"]["data_only"][key]
            result["dali_over_torch"] = ratios
            print("dali / torch: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
    return 0
