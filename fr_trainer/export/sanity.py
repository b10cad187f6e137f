"""Refusing to export a model that cannot be a working face model.

The ONNX parity check compares onnxruntime with torch, so it passes for a diverged model
too (NaN weights, or BatchNorm statistics gone to inf that make every embedding the same).
`check_exportable` catches those before the export: every parameter and buffer must be
finite, and the embeddings of a few distinct random face images must be finite and must
differ (an embedding that does not depend on its input identifies nobody).
`fr-trainer export` turns `ModelNotExportable` into exit status 2.
"""

from __future__ import annotations

import torch
from torch import nn

from fr_trainer.export.onnx_export import _cpu_fp32_eval, random_face_batch, unwrap

# distinct inputs whose embeddings differ by no more than this (relative to the embedding
# scale) count as "the same for every input"
CONSTANT_TOLERANCE = 1e-6


class ModelNotExportable(ValueError):
    """Non-finite weights, or embeddings that are non-finite or do not depend on the input."""


def _nonfinite_tensors(model: nn.Module) -> list[str]:
    named = list(model.named_parameters()) + list(model.named_buffers())
    return [
        name
        for name, t in named
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all())
    ]


def check_exportable(model: nn.Module, num_inputs: int = 4, seed: int = 12345) -> None:
    """Raise ModelNotExportable (naming the reason and what to do) unless `model` has
    finite weights and gives finite embeddings that differ for `num_inputs` distinct random
    face images. The model's mode, device and dtype are left as they were."""
    model = unwrap(model)
    bad = _nonfinite_tensors(model)
    if bad:
        more = f", ... ({len(bad)} tensors in all)" if len(bad) > 4 else ""
        raise ModelNotExportable(
            f"the model has NaN/inf weights ({', '.join(bad[:4])}{more}): training diverged; "
            "export an earlier finite checkpoint (checkpoints/step_*) or retrain with a lower "
            "optim.lr"
        )
    x = random_face_batch(num_inputs, seed)
    with _cpu_fp32_eval(model) as reference, torch.no_grad():
        out = reference(x).float()
    if not bool(torch.isfinite(out).all()):
        raise ModelNotExportable(
            "the model's embeddings of random face images hold NaN/inf: it is broken; "
            "export an earlier checkpoint or retrain"
        )
    spread = float((out - out[:1]).abs().max())
    scale = max(1.0, float(out.abs().max()))
    if spread <= CONSTANT_TOLERANCE * scale:
        raise ModelNotExportable(
            f"the model's embedding is the same for every input ({num_inputs} distinct random "
            f"face images differ by at most {spread:.3g}): it has collapsed (e.g. BatchNorm "
            "statistics gone to inf); export an earlier checkpoint or retrain with a lower optim.lr"
        )
