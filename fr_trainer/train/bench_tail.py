"""`fr-trainer bench tail`: the tail of a training step, multi-tensor against one tensor at a time.

The tail is what a step does after its backward: clip the global gradient norm, step the
optimizer (SGD with momentum and decay, or AdamW), update the EMA. The trainer runs it in
multi-tensor ops (`fr_trainer.train.foreach`); the reference, timed in the same run on the
same tensors, is the plain one-op-per-tensor loop of the same rules. Printed per part: the
aten ops that do work (views aside; on a GPU each is a kernel launch) and the median time
of a call, the device synchronised before the clock starts and before it stops.

    fr-trainer bench tail --backbone iresnet50 [--device cuda] [--optimizer adamw] [--json F]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from fr_trainer.backbones import create_backbone
from fr_trainer.devices import synchronize
from fr_trainer.heads.step_count import OpCounter
from fr_trainer.train.ema import BackboneEMA
from fr_trainer.train.grads import clip_global_norm
from fr_trainer.train.optim import SGD, AdamW


def reference_clip(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Global-norm clipping one tensor at a time (float64 square sums)."""
    total = torch.zeros((), dtype=torch.float64, device=params[0].device)
    for p in params:
        total = total + torch.linalg.vector_norm(p.grad, dtype=torch.float64).square()
    norm = total.sqrt()
    factor = torch.where(norm > max_norm, max_norm / (norm + 1e-6), torch.ones_like(norm))
    for p in params:
        p.grad.mul_(factor.to(p.grad.dtype))
    return norm


class ReferenceSGD:
    """buf = momentum * buf + grad + decay * w; w -= lr * buf, one tensor at a time."""

    def __init__(self, params: list[nn.Parameter], lr: float, momentum: float, weight_decay: float) -> None:
        self.params, self.lr, self.momentum, self.decay = params, lr, momentum, weight_decay
        self.buffers = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step(self) -> None:
        for p, buf in zip(self.params, self.buffers):
            buf.mul_(self.momentum).add_(p.grad).add_(p, alpha=self.decay)
            p.add_(buf, alpha=-self.lr)


class ReferenceAdamW:
    """AdamW with decoupled decay, one tensor at a time (one step count for all)."""

    def __init__(self, params: list[nn.Parameter], lr: float, weight_decay: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.params, self.lr, self.decay, self.betas, self.eps = params, lr, weight_decay, betas, eps
        self.moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
        self.steps = 0

    @torch.no_grad()
    def step(self) -> None:
        self.steps += 1
        beta1, beta2 = self.betas
        c1, c2 = 1 - beta1 ** self.steps, 1 - beta2 ** self.steps
        for p, (m, v) in zip(self.params, self.moments):
            m.mul_(beta1).add_(p.grad, alpha=1 - beta1)
            v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            p.mul_(1 - self.lr * self.decay).addcdiv_(m / c1, (v / c2).sqrt_().add_(self.eps), value=-self.lr)


@torch.no_grad()
def reference_ema(average: nn.Module, source: nn.Module, decay: float) -> None:
    for a, p in zip(average.parameters(), source.parameters()):
        a.mul_(decay).add_(p, alpha=1 - decay)
    for a, b in zip(average.buffers(), source.buffers()):
        a.copy_(b)


def measure(action: Callable[[], object], device: torch.device, iters: int) -> tuple[int, float]:
    """(work ops of one call, median ms of `iters` calls); one warm-up call first."""
    action()
    with OpCounter() as counter:
        action()
    times = []
    for _ in range(iters):
        synchronize(device)
        start = time.perf_counter()
        action()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return counter.work_ops, statistics.median(times)


def parts(network: nn.Module, optimizer: str, device: torch.device) -> dict[str, tuple[Callable, Callable]]:
    """{part: (trainer's call, one-tensor reference call)}, each on its own copy of the
    parameters (so the two never share state)."""
    mine, theirs = network, copy.deepcopy(network)
    for a, b in zip(mine.parameters(), theirs.parameters()):
        a.grad = torch.randn_like(a)
        b.grad = a.grad.clone()
    ours_params, ref_params = list(mine.parameters()), list(theirs.parameters())
    if optimizer == "sgd":
        ours = SGD(ours_params, lr=0.1, momentum=0.9, weight_decay=5e-4)
        ref = ReferenceSGD(ref_params, lr=0.1, momentum=0.9, weight_decay=5e-4)
    else:
        ours = AdamW(ours_params, lr=1e-3, weight_decay=0.05)
        ref = ReferenceAdamW(ref_params, lr=1e-3, weight_decay=0.05)
    ema = BackboneEMA(copy.deepcopy(mine), mine, 0.999)
    ref_average = copy.deepcopy(theirs).requires_grad_(False)
    return {
        "clip": (lambda: clip_global_norm(ours_params, [], 5.0), lambda: reference_clip(ref_params, 5.0)),
        optimizer: (ours.step, ref.step),
        "ema": (lambda: ema.update(mine), lambda: reference_ema(ref_average, theirs, 0.999)),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fr-trainer bench tail", description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="iresnet50")
    parser.add_argument("--embedding-size", type=int, default=512)
    parser.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on a CPU")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--json", default=None, help="also write the results here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    device = torch.device(args.device)
    torch.manual_seed(0)
    network = create_backbone(args.backbone, embedding_size=args.embedding_size).to(device)
    params = list(network.parameters())
    results = []
    for part, (ours, reference) in parts(network, args.optimizer, device).items():
        ours_ops, ours_ms = measure(ours, device, args.iters)
        ref_ops, ref_ms = measure(reference, device, args.iters)
        results.append({"part": part, "ops": ours_ops, "ms": ours_ms, "reference_ops": ref_ops,
                        "reference_ms": ref_ms, "ratio": ours_ms / ref_ms})
    print(f"{args.backbone}: {len(params)} parameter tensors, {sum(p.numel() for p in params) / 1e6:.1f}M "
          f"parameters, {device}")
    print("| part | ops | ms | one tensor at a time: ops | ms | ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['part']} | {r['ops']} | {r['ms']:.2f} | {r['reference_ops']} | {r['reference_ms']:.2f} | "
              f"{r['ratio']:.2f} |")
    if args.json:
        config = {k: v for k, v in vars(args).items() if k != "json"}
        with open(args.json, "w") as out:
            json.dump({"config": config, "parameter_tensors": len(params), "results": results}, out, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
