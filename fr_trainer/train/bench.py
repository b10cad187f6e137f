"""`fr-trainer bench train`: samples/s of a full training step, and where the time goes.

One step = next batch (data) + backbone forward + head forward/backward (PartialFC,
all-gather and distributed softmax included) + backbone backward (DDP all-reduce
included) + optimizer step. The split is measured by cutting the graph at the
embeddings: the head is run on detached embeddings, their gradient is then pushed
through the backbone, which is exactly what the joint backward computes.

    fr-trainer bench train --backbone mobilefacenet --batch-size 64 --world-size 2
    fr-trainer bench train --data data/synth --num-workers 2      # real decode in the loop
"""

from __future__ import annotations

import argparse
import json
import time

import torch


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
    p.add_argument("--json", default=None, help="also write the result here")
    return p


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batches(args, rank: int, world_size: int, device: torch.device):
    if args.data:
        from fr_trainer.train.config import config_from_dict
        from fr_trainer.train.data_setup import BatchStream, build_train_data, open_dataset

        cfg = config_from_dict(
            {
                "data": {
                    "root": args.data,
                    "batch_size": args.batch_size,
                    "num_workers": args.num_workers,
                }
            }
        )
        dataset = open_dataset(cfg)
        stream = BatchStream(build_train_data(cfg, dataset, rank, world_size, device))
        return stream.next, dataset.num_classes
    generator = torch.Generator().manual_seed(rank)
    images = torch.randn(args.batch_size, 3, 112, 112, generator=generator).to(device)
    labels = torch.randint(0, args.num_classes, (args.batch_size,), generator=generator).to(device)
    return (lambda: (images, labels)), args.num_classes


def bench_rank(rank: int, world_size: int, args: argparse.Namespace) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    from fr_trainer.backbones import create_backbone
    from fr_trainer.heads import PartialFC
    from fr_trainer.train.grads import scale_backbone_grad
    from fr_trainer.train.optim import SGD
    from fr_trainer.train.runtime import resolve_device, resolve_precision

    torch.set_num_threads(args.threads)
    device_type = resolve_device(args.device)
    device = torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")
    precision = resolve_precision(args.precision, device_type)
    next_batch, num_classes = _batches(args, rank, world_size, device)
    torch.manual_seed(0)
    backbone = create_backbone(args.backbone, embedding_size=args.embedding_size).to(device)
    model = DistributedDataParallel(backbone) if world_size > 1 else backbone
    head = PartialFC(
        num_classes, args.embedding_size, margin=args.margin, sample_rate=args.sample_rate, seed=0
    ).to(device)
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
            _sync(device)
            total_start = time.perf_counter()
        t0 = time.perf_counter()
        images, labels = next_batch()
        _sync(device)
        t1 = time.perf_counter()
        with precision.autocast(device):
            embeddings = model(images)
        _sync(device)
        t2 = time.perf_counter()
        features = embeddings.detach().float().requires_grad_()
        loss = head(features, labels)
        (scaler.scale(loss) if scaler else loss).backward()
        _sync(device)
        t3 = time.perf_counter()
        scale_backbone_grad(embeddings, world_size).backward(features.grad.to(embeddings.dtype))
        _sync(device)
        t4 = time.perf_counter()
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
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
        "parts": parts,
        "loss": float(loss.detach()),
        "num_classes": num_classes,
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.world_size > 1:
        from fr_trainer.distributed.spawn import run_ranks

        if args.data and args.num_workers:
            # spawned ranks are daemonic and cannot start DataLoader workers
            print(
                f"note: --world-size {args.world_size} with --data decodes in the rank processes "
                "(--num-workers 0); the data share is then the full decode cost"
            )
            args.num_workers = 0

        backend = (
            "nccl"
            if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
            else "gloo"
        )
        results = run_ranks(
            bench_rank, args.world_size, args, backend=backend, threads=args.threads, timeout_s=3600
        )
    else:
        results = [bench_rank(0, 1, args)]
    seconds = max(r["seconds"] for r in results)
    samples = args.steps * args.batch_size * args.world_size
    parts = {k: sum(r["parts"][k] for r in results) / len(results) for k in results[0]["parts"]}
    share = {k: v / sum(parts.values()) for k, v in parts.items()}
    out = {
        "backbone": args.backbone,
        "batch_size": args.batch_size,
        "world_size": args.world_size,
        "num_classes": results[0]["num_classes"],
        "sample_rate": args.sample_rate,
        "device": args.device,
        "precision": args.precision,
        "threads_per_rank": args.threads,
        "data": args.data or "random tensors",
        "samples_per_s": samples / seconds,
        "step_ms": 1000 * seconds / args.steps,
        "share": share,
    }
    print(
        f"{args.backbone} batch {args.batch_size} x {args.world_size} rank(s), {out['num_classes']} classes "
        f"(sample_rate {args.sample_rate}), {out['data']}: {out['samples_per_s']:.1f} samples/s, "
        f"{out['step_ms']:.0f} ms/step; time share: "
        + ", ".join(f"{k} {v * 100:.0f}%" for k, v in share.items())
    )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(out, handle, indent=2)
    return 0
