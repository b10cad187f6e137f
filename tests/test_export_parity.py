"""ONNX export: torch vs onnxruntime parity for every registered backbone at batch 1 and 7.

One export and one onnxruntime session per backbone; the comparison here is written
independently of the library's own check (which is tested in test_export_api.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fr_trainer.backbones import create_backbone, list_backbones
from fr_trainer.backbones.iresnet import IBasicBlock
from fr_trainer.backbones.mobilefacenet import Bottleneck
from fr_trainer.export import TOLERANCE_FP32, export_onnx_with_report, load_onnx_session


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial BN statistics and affine params (so BN folding is really tested); the
    last BN of residual branches is damped so deep nets stay at a sane scale in eval."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) * 0.5 + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.1)
        for m in model.modules():
            if isinstance(m, IBasicBlock):
                m.bn3.weight.mul_(0.2)
            elif isinstance(m, Bottleneck) and m.residual:
                m.block[-1][1].weight.mul_(0.2)


def face_images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n, 3, 112, 112), generator=g).float() / 255 - 0.5) / 0.5


# The full-size ViTs and the deep iresnets are exported, with the same parity check, by the
# benchmark (`python -m fr_trainer.export.bench`, docs/benchmarks.md), not here: vit_t runs
# at 2 blocks (the same graph, per block), vit_demo at its own 4; vit_s/b/l take minutes on a
# CPU and vit_h's file passes protobuf's 2 GB; iresnet100/200 are iresnet50's blocks, more of
# them (half a minute of the suite's 10).
REDUCED = {"vit_t": {"depth": 2}}
BENCH_ONLY = {"vit_s", "vit_b", "vit_l", "vit_h", "iresnet100", "iresnet200"}


SHIPPED = [name for name in list_backbones() if not name.startswith("test_")]  # tests may register more


@pytest.mark.parametrize("name", [n for n in SHIPPED if n not in BENCH_ONLY])
def test_onnxruntime_matches_torch_at_batch_1_and_7(name, tmp_path):
    torch.manual_seed(0)
    model = create_backbone(name, embedding_size=512, **REDUCED.get(name, {}))
    randomize_batchnorm(model)
    path = tmp_path / f"{name}.onnx"
    report = export_onnx_with_report(model, path, check=False, latency_runs=0)
    assert path.is_file() and not (tmp_path / f"{name}.onnx.tmp").exists()
    assert report.size_bytes == path.stat().st_size
    # fp32 initialisers: the file holds at least 4 bytes per parameter (BN folded away)
    assert report.size_bytes > 4 * 0.95 * report.num_parameters

    session, info = load_onnx_session(path)
    assert info.input_name == "input" and info.output_name == "embedding"
    assert not isinstance(info.input_shape[0], int), "batch axis must be dynamic"
    assert info.embedding_size == model.num_features == 512

    x = face_images(7, seed=11)
    model.eval()
    with torch.no_grad():
        expected = {7: model(x).double(), 1: model(x[:1]).double()}
    for b in (1, 7):
        got = torch.from_numpy(session.run(None, {"input": x[:b].numpy()})[0]).double()
        assert got.shape == (b, 512)
        ref = expected[b]
        scale = max(1.0, ref.abs().max().item())
        rel = (got - ref).abs().max().item() / scale
        cos = torch.nn.functional.cosine_similarity(got, ref, dim=1).min().item()
        print(f"{name} batch {b}: relative max diff {rel:.2e} (scale {scale:.2f}), min cos {cos:.8f}")
        assert rel <= TOLERANCE_FP32, f"{name} batch {b}: {rel:.3g} > {TOLERANCE_FP32}"
        assert cos >= 1 - 1e-5
        assert np.isfinite(got.numpy()).all()
