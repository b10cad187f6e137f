"""Small backbones for CPU demos and tests, registered in the backbone registry.

`demonet`: a depthwise-separable stack that takes the usual [B,3,112,112] faces and
reaches the 7x7 map in five stride-2 stages with few channels; on a 2-core CPU it trains
~20x faster than MobileFaceNet, which makes the quickstart fit in minutes. It is a real
face backbone (GDC head, BN1d embedding) and exports to ONNX like the others.
Registered with the other backbones when `fr_trainer.backbones` is imported.
"""

from __future__ import annotations

import torch
from torch import nn

from fr_trainer.backbones.base import FaceBackbone, check_head_args, init_weights
from fr_trainer.backbones.registry import BACKBONES


def _conv_bn(
    cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True
) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act:
        layers.append(nn.PReLU(cout))
    return nn.Sequential(*layers)


def _separable(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(_conv_bn(cin, cin, 3, stride, groups=cin), _conv_bn(cin, cout, 1))


class DemoNet(FaceBackbone):
    """images [B,3,112,112] -> embeddings [B, embedding_size]; `width` scales channels."""

    def __init__(self, embedding_size: int = 128, width: int = 16, dropout: float = 0.0) -> None:
        super().__init__()
        check_head_args(embedding_size, dropout)
        w = width
        self.num_features = embedding_size
        self.feature_channels = 8 * w
        self.stem = _conv_bn(3, w, 3, stride=2)  # 56
        self.blocks = nn.ModuleList(
            [
                _separable(w, 2 * w, 2),  # 28
                _separable(2 * w, 4 * w, 2),  # 14
                nn.Sequential(_separable(4 * w, 4 * w, 1), _separable(4 * w, 8 * w, 2)),  # 7
                _separable(8 * w, 8 * w, 1),
            ]
        )
        self.gdc = nn.Sequential(
            nn.Conv2d(8 * w, 8 * w, 7, groups=8 * w, bias=False), nn.BatchNorm2d(8 * w)
        )
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(8 * w, embedding_size, bias=False)
        self.features = nn.BatchNorm1d(embedding_size)
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[B,3,112,112] -> [B, 8*width, 7, 7]."""
        self._check_input(x)
        return self._run_stages(x, [self.stem, *self.blocks])

    def forward_head(self, feature_map: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.gdc(feature_map), 1)
        return self.features(self.linear(self.dropout(x)))


@BACKBONES.register("demonet")
def demonet(embedding_size: int = 128, width: int = 16, dropout: float = 0.0) -> DemoNet:
    """A small CPU-friendly face backbone (see the module docstring)."""
    return DemoNet(embedding_size=embedding_size, width=width, dropout=dropout)
