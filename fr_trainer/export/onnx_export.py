"""ONNX export of a face backbone, with an onnxruntime parity check and a latency probe.

The exported graph (FORMATS.md, ONNX): input "input" float32 [N,3,112,112] with a dynamic
batch, RGB normalised as (x/255-0.5)/0.5 *outside* the graph; one output "embedding"
[N,D]; opset 17 by default; fp32 initialisers (or fp16 weights with fp32 I/O when asked).

Parity, stated: for each checked batch size (1 and 7 by default) the eval-mode torch
embedding e and the onnxruntime embedding o of the same inputs must satisfy

    max |o - e|  <=  tolerance * max(1, max |e|)      and, per row,
    cosine(o, e) >= 1 - cosine_tolerance

with tolerance = 1e-4 and cosine_tolerance = 1e-5 for fp32 (the differences come from
onnxruntime fusing BatchNorm into the convolutions and reordering sums: typically ~1e-6
relative), and 2e-2 / 1e-3 for fp16 weights (checked against the fp32 torch model, i.e.
the error the deployment will see). The cosine bound is the scale-free one: it still bites
when the embedding's scale is far below 1. The test inputs are random 8-bit images
normalised like real ones (seeded).
"""

from __future__ import annotations

import contextlib
import copy
import os
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fr_trainer.export._deps import require
from fr_trainer.export.model_io import load_onnx_session

DEFAULT_OPSET = 17
TOLERANCE_FP32 = 1e-4
TOLERANCE_FP16 = 2e-2
COSINE_TOLERANCE_FP32 = 1e-5
COSINE_TOLERANCE_FP16 = 1e-3
INPUT_NAME = "input"
OUTPUT_NAME = "embedding"


class ParityError(RuntimeError):
    """onnxruntime's output differs from torch's beyond the stated tolerance."""


@dataclass
class BatchParity:
    batch_size: int
    max_abs_diff: float
    scale: float          # max(1, max |torch embedding|)
    min_cosine: float

    @property
    def relative_diff(self) -> float:
        return self.max_abs_diff / self.scale


@dataclass
class ExportReport:
    """What `export_onnx_with_report` did: file, parity and onnxruntime CPU latency."""

    path: Path
    model: str
    opset: int
    fp16: bool
    embedding_size: int
    num_parameters: int
    size_bytes: int
    tolerance: float                                   # relative, see module docstring
    cosine_tolerance: float                            # min cosine >= 1 - this
    parity: dict[int, BatchParity] = field(default_factory=dict)
    latency_ms: dict[int, float] = field(default_factory=dict)   # median, per batch size

    @property
    def checked(self) -> bool:
        return bool(self.parity)

    @property
    def max_abs_diff(self) -> float:
        return max((p.max_abs_diff for p in self.parity.values()), default=float("nan"))

    @property
    def max_relative_diff(self) -> float:
        return max((p.relative_diff for p in self.parity.values()), default=float("nan"))

    @property
    def min_cosine(self) -> float:
        return min((p.min_cosine for p in self.parity.values()), default=float("nan"))

    @property
    def passed(self) -> bool:
        return all(p.relative_diff <= self.tolerance
                   and p.min_cosine >= 1.0 - self.cosine_tolerance
                   for p in self.parity.values())

    def to_dict(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        d.update(max_abs_diff=self.max_abs_diff, max_relative_diff=self.max_relative_diff,
                 min_cosine=self.min_cosine, passed=self.passed)
        return d

    def summary(self) -> str:
        lines = [
            f"exported {self.model} -> {self.path}",
            (f"  opset {self.opset}, {'fp16' if self.fp16 else 'fp32'} weights, "
             f"embedding {self.embedding_size}, {self.num_parameters / 1e6:.2f}M parameters, "
             f"{self.size_bytes / 2**20:.1f} MiB"),
        ]
        for b, p in sorted(self.parity.items()):
            lines.append(
                f"  parity batch {b}: max|ort-torch| {p.max_abs_diff:.3g} "
                f"(relative {p.relative_diff:.3g} <= {self.tolerance:g}), "
                f"min cosine {p.min_cosine:.7f} (>= {1.0 - self.cosine_tolerance:g})"
            )
        if not self.parity:
            lines.append("  parity: not checked")
        for b, ms in sorted(self.latency_ms.items()):
            lines.append(f"  onnxruntime CPU latency batch {b}: {ms:.2f} ms")
        return "\n".join(lines)


def export_onnx(backbone: nn.Module, path: str | os.PathLike, **kwargs) -> Path:
    """Export `backbone` to `path` and check parity; returns the path.

    Same options as `export_onnx_with_report`, which also returns the figures.
    """
    return export_onnx_with_report(backbone, path, **kwargs).path


def export_onnx_with_report(
    backbone: nn.Module,
    path: str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    fp16: bool = False,
    check: bool = True,
    batch_sizes: tuple[int, ...] = (1, 7),
    tolerance: float | None = None,
    cosine_tolerance: float | None = None,
    images: torch.Tensor | None = None,
    latency_runs: int = 5,
    num_threads: int | None = None,
    seed: int = 0,
) -> ExportReport:
    """Export a backbone (images [N,3,112,112] -> [N,D]) to ONNX and check it.

    backbone: a registry backbone, or a wrapper (DDP `.module`, torch.compile `_orig_mod`,
        TwoHeadBackbone: its embedding head is exported). It is exported in eval mode; its
        own mode, device and dtype are left as they were.
    check: run onnxruntime on each of `batch_sizes` and raise `ParityError` when it differs
        from torch beyond `tolerance` (default 1e-4 fp32 / 2e-2 fp16, relative to the
        embedding scale) or `cosine_tolerance` (default 1e-5 / 1e-3; min cosine >= 1 - it);
        see the module docstring. A rejected file is kept as
        `<path>.rejected` for inspection; `path` is only written on success.
    images: optional normalised inputs [M,3,112,112] for the check (M >= max batch size);
        default: seeded random 8-bit images, normalised.
    latency_runs: timed onnxruntime runs per batch size (median reported; 0 skips).
    """
    require("onnx")
    require("onnxruntime")
    path = Path(path)
    if path.parent and not path.parent.is_dir():
        raise FileNotFoundError(f"output directory {path.parent} does not exist (for {path})")
    if tolerance is None:
        tolerance = TOLERANCE_FP16 if fp16 else TOLERANCE_FP32
    if cosine_tolerance is None:
        cosine_tolerance = COSINE_TOLERANCE_FP16 if fp16 else COSINE_TOLERANCE_FP32
    model = unwrap(backbone)
    tmp = path.with_name(path.name + ".tmp")
    with _cpu_fp32_eval(model) as reference:
        embedding_size = _export(reference, tmp, opset=opset, fp16=fp16)
        report = ExportReport(
            path=path, model=_model_name(model), opset=opset, fp16=fp16,
            embedding_size=embedding_size,
            num_parameters=sum(p.numel() for p in reference.parameters()),
            size_bytes=tmp.stat().st_size, tolerance=tolerance,
            cosine_tolerance=cosine_tolerance,
        )
        session, _ = load_onnx_session(tmp, num_threads=num_threads)
        if check:
            x = images if images is not None else random_face_batch(max(batch_sizes), seed)
            if x.shape[0] < max(batch_sizes):
                raise ValueError(f"images has {x.shape[0]} rows; the check needs {max(batch_sizes)}")
            for b in batch_sizes:
                report.parity[b] = _parity(reference, session, x[:b].float().cpu())
    for b in batch_sizes if latency_runs > 0 else ():
        report.latency_ms[b] = ort_latency_ms(session, b, runs=latency_runs)
    del session
    if check and not report.passed:
        rejected = path.with_name(path.name + ".rejected")
        os.replace(tmp, rejected)
        raise ParityError(
            f"ONNX export of {report.model} does not match torch: "
            f"max relative difference {report.max_relative_diff:.3g} (tolerance {tolerance:g}), "
            f"min cosine {report.min_cosine:.7f} (needs >= {1 - cosine_tolerance:g}), "
            f"max abs {report.max_abs_diff:.3g}; "
            f"the file is kept as {rejected}\n{report.summary()}"
        )
    os.replace(tmp, path)
    return report


def unwrap(model: nn.Module) -> nn.Module:
    """The single-output backbone inside DDP / torch.compile / TwoHeadBackbone wrappers."""
    from fr_trainer.backbones.two_head import TwoHeadBackbone

    while True:
        if isinstance(model, TwoHeadBackbone):
            model = model.backbone
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        elif type(model).__name__ in ("DistributedDataParallel", "DataParallel"):
            model = model.module
        else:
            return model


def random_face_batch(n: int, seed: int = 0) -> torch.Tensor:
    """n random 8-bit RGB 112x112 images, normalised as (x/255-0.5)/0.5 -> [n,3,112,112]."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (n, 3, 112, 112), generator=g).float()
    return (pixels / 255.0 - 0.5) / 0.5


def ort_latency_ms(session, batch_size: int, runs: int = 5, warmup: int = 1) -> float:
    """Median wall time (ms) of one onnxruntime run on a [batch_size,3,112,112] batch."""
    x = random_face_batch(batch_size, seed=1).numpy()
    name = session.get_inputs()[0].name
    for _ in range(warmup):
        session.run(None, {name: x})
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        session.run(None, {name: x})
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


# -- steps ----------------------------------------------------------------------------

def _model_name(model: nn.Module) -> str:
    return getattr(model, "backbone_name", None) or type(model).__name__


@contextlib.contextmanager
def _cpu_fp32_eval(model: nn.Module):
    """The model itself in eval mode (restored after) when it is already CPU fp32;
    otherwise an eval-mode CPU fp32 copy."""
    tensors = list(model.parameters()) + list(model.buffers())
    in_place = all(t.device.type == "cpu" and (t.dtype == torch.float32 or not t.is_floating_point())
                   for t in tensors)
    target = model if in_place else copy.deepcopy(model).cpu().float()
    was_training = model.training
    target.eval()
    try:
        yield target
    finally:
        if in_place:
            model.train(was_training)


class _Fp16Weights(nn.Module):
    """fp16 weights, fp32 interface: casts the input to half and the embedding back."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = copy.deepcopy(model).half()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.half()).float()


def _export(model: nn.Module, path: Path, *, opset: int, fp16: bool) -> int:
    """Write the ONNX file; returns the embedding size."""
    module = _Fp16Weights(model).eval() if fp16 else model
    # batch 1 keeps tracing cheap; the batch axis is declared dynamic and the parity
    # check runs other batch sizes (7 by default), which catches any specialisation.
    dummy = random_face_batch(1, seed=2)
    embedding_size = getattr(model, "num_features", None)
    if not isinstance(embedding_size, int):
        with torch.no_grad():
            embedding_size = int(model(dummy).shape[1])
    with torch.no_grad(), warnings.catch_warnings():
        # the TorchScript exporter is chosen on purpose (it honours opset_version and
        # dynamic_axes); silence its deprecation notices.
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message=".*The feature will be removed.*")
        torch.onnx.export(
            module,
            (dummy,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    return embedding_size


def _parity(model: nn.Module, session, x: torch.Tensor) -> BatchParity:
    with torch.no_grad():
        expected = model(x).numpy().astype(np.float64)
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0].astype(np.float64)
    if got.shape != expected.shape:
        raise ParityError(f"onnxruntime output shape {got.shape} != torch {expected.shape}")
    diff = float(np.abs(got - expected).max())
    scale = max(1.0, float(np.abs(expected).max()))
    norms = np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1)
    cos = np.where(norms > 0, (got * expected).sum(1) / np.where(norms > 0, norms, 1.0),
                   np.where(np.abs(got - expected).max(1) == 0, 1.0, 0.0))
    return BatchParity(int(x.shape[0]), diff, scale, float(cos.min()))
