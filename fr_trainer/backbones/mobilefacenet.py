"""MobileFaceNet (Chen et al., "MobileFaceNets: Efficient CNNs for Accurate Real-Time
Face Verification on Mobile Devices", CCBR 2018, Table 1), PReLU throughout:

    112x112x3   conv3x3 s2, 64                       -> 56x56x64
    56x56x64    depthwise conv3x3, 64                -> 56x56x64
    56x56x64    bottleneck t=2, c=64,  n=5, s=2      -> 28x28x64
    28x28x64    bottleneck t=4, c=128, n=1, s=2      -> 14x14x128
    14x14x128   bottleneck t=2, c=128, n=6, s=1
    14x14x128   bottleneck t=4, c=128, n=1, s=2      -> 7x7x128
    7x7x128     bottleneck t=2, c=128, n=2, s=1
    7x7x128     conv1x1, 512                         -> 7x7x512   (forward_features)
    7x7x512     linear GDConv7x7 (global depthwise), 512 -> 1x1x512
    1x1x512     linear 1x1 (here: flatten - Linear) , D  -> D      (+ BN1d)

A bottleneck (MobileNetV2) is conv1x1 expand x t - BN - PReLU - depthwise conv3x3(stride) -
BN - PReLU - conv1x1 project - BN (linear), with a residual when stride 1 and the shape
is kept. The paper's embedding is 128-d (0.99M parameters); here D defaults to 512 like
the rest of the registry (about 1.2M parameters).

`mbf` is arcface_torch's MobileFaceNet ("mobilefacenet-0.45G", `get_mbf`, scale 2): the
same stages with twice the block widths (stem 128 channels, its second conv grouped in 64
groups of 2; blocks 128/256 wide, expansions to 128/256/512/256), 2.0M parameters,
0.45 GMACs. Its checkpoints load after `fr_trainer.backbones.pretrained` renames their keys.
"""

from __future__ import annotations

import torch
from torch import nn

from fr_trainer.backbones.base import FaceBackbone, check_head_args, init_weights
from fr_trainer.backbones.registry import BACKBONES

# (expansion t, output channels c, repeats n, stride of the first repeat s)
SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (2, 64, 5, 2),
    (4, 128, 1, 2),
    (2, 128, 6, 1),
    (4, 128, 1, 2),
    (2, 128, 2, 1),
)
# arcface_torch's `mbf` (scale 2, blocks (1, 4, 6, 2)), in the same (t, c, n, s) terms:
# the expansion widths 128/256/256/512/256 with block widths 128/256
MBF_SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (1, 128, 5, 2),
    (2, 256, 1, 2),
    (1, 256, 6, 1),
    (2, 256, 1, 2),
    (1, 256, 2, 1),
)


class ConvBN(nn.Sequential):
    """conv - BN, followed by a channel-wise PReLU unless `linear`."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1,
                 groups: int = 1, linear: bool = False, padding: int | None = None) -> None:
        padding = kernel // 2 if padding is None else padding
        layers: list[nn.Module] = [
            nn.Conv2d(cin, cout, kernel, stride, padding=padding, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
        ]
        if not linear:
            layers.append(nn.PReLU(cout))
        super().__init__(*layers)


class Bottleneck(nn.Module):
    """Inverted residual: expand 1x1 - depthwise 3x3(stride) - linear project 1x1."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = cin * expansion
        self.residual = stride == 1 and cin == cout
        self.block = nn.Sequential(
            ConvBN(cin, hidden, 1),
            ConvBN(hidden, hidden, 3, stride, groups=hidden),
            ConvBN(hidden, cout, 1, linear=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.residual else out


class MobileFaceNet(FaceBackbone):
    """images [B,3,112,112] -> embeddings [B, embedding_size]."""

    def __init__(self, embedding_size: int = 512, dropout: float = 0.0,
                 feature_channels: int = 512,
                 settings: tuple[tuple[int, int, int, int], ...] = SETTINGS,
                 stem_channels: int = 64, stem_groups: int = 64) -> None:
        super().__init__()
        check_head_args(embedding_size, dropout)
        self.num_features = embedding_size
        self.feature_channels = feature_channels
        self.stem = nn.Sequential(
            ConvBN(3, stem_channels, 3, stride=2),
            ConvBN(stem_channels, stem_channels, 3, groups=stem_groups),
        )
        stages: list[nn.Module] = []
        cin = stem_channels
        for t, c, n, s in settings:
            blocks = [Bottleneck(cin if i == 0 else c, c, s if i == 0 else 1, t) for i in range(n)]
            stages.append(nn.Sequential(*blocks))
            cin = c
        self.stages = nn.ModuleList(stages)
        self.conv_out = ConvBN(cin, feature_channels, 1)
        # global depthwise conv: one 7x7 filter per channel, no padding -> 1x1
        self.gdc = ConvBN(feature_channels, feature_channels, self.feature_size[0],
                          groups=feature_channels, linear=True, padding=0)
        self.dropout = nn.Dropout(p=dropout)
        self.linear = nn.Linear(feature_channels, embedding_size, bias=False)
        self.features = nn.BatchNorm1d(embedding_size)
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """images [B,3,112,112] -> feature map [B,512,7,7]."""
        self._check_input(x)
        return self._run_stages(x, [self.stem, *self.stages, self.conv_out])

    def forward_head(self, feature_map: torch.Tensor) -> torch.Tensor:
        """feature map [B,512,7,7] -> embeddings [B,D] (GDC - flatten - Linear - BN1d)."""
        x = torch.flatten(self.gdc(feature_map), 1)
        return self.features(self.linear(self.dropout(x)))


@BACKBONES.register("mobilefacenet")
def mobilefacenet(embedding_size: int = 512, dropout: float = 0.0) -> MobileFaceNet:
    """MobileFaceNet (Chen et al. 2018) with a D-dimensional embedding."""
    return MobileFaceNet(embedding_size=embedding_size, dropout=dropout)


@BACKBONES.register("mbf")
def mbf(embedding_size: int = 512, dropout: float = 0.0) -> MobileFaceNet:
    """arcface_torch's MobileFaceNet (`get_mbf`, scale 2, "mobilefacenet-0.45G")."""
    return MobileFaceNet(embedding_size=embedding_size, dropout=dropout, settings=MBF_SETTINGS,
                         stem_channels=128, stem_groups=64)
