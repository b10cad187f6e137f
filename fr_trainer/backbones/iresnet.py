"""IResNet: the improved residual network of ArcFace (Deng et al., CVPR 2019, sec. 3.2).

For 112x112 aligned faces:

- input stem: conv3x3(3 -> 64, stride 1) - BN - PReLU (no max-pool), 112x112;
- four stages of 64/128/256/512 channels, each starting with a stride-2 block:
  112 -> 56 -> 28 -> 14 -> 7;
- the improved basic block: BN - conv3x3 - BN - PReLU - conv3x3(stride) - BN, added to
  the shortcut (identity, or conv1x1(stride) - BN where shape changes); no activation after
  the addition;
- output block "E": BN2d - dropout - flatten - FC(512*7*7 -> D) - BN1d -> embedding [B, D].

Depths: 18 [2,2,2,2], 34 [3,4,6,3], 50 [3,4,14,3], 100 [3,13,30,3], 200 [6,26,60,6].
Parameter names follow the common layout of published arcface_torch checkpoints
(`conv1, bn1, prelu, layer1..4, bn2, fc, features`; blocks `bn1, conv1, bn2, prelu,
conv2, bn3, downsample`), so those state_dicts load with `load_state_dict`.
"""

from __future__ import annotations

import torch
from torch import nn

from fr_trainer.backbones.base import FaceBackbone, check_head_args, init_weights
from fr_trainer.backbones.registry import BACKBONES

BN_EPS = 1e-5
LAYERS: dict[int, tuple[int, int, int, int]] = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 14, 3),
    100: (3, 13, 30, 3),
    200: (6, 26, 60, 6),
}
WIDTHS = (64, 128, 256, 512)


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """BN - conv3x3 - BN - PReLU - conv3x3(stride) - BN, plus the shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, eps=BN_EPS)
        self.conv1 = _conv3x3(cin, cout)
        self.bn2 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.prelu = nn.PReLU(cout)
        self.conv2 = _conv3x3(cout, cout, stride)
        self.bn3 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(cout, eps=BN_EPS),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn1(x)
        out = self.conv1(out)
        out = self.bn2(out)
        out = self.prelu(out)
        out = self.conv2(out)
        out = self.bn3(out)
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut


class IResNet(FaceBackbone):
    """images [B,3,112,112] -> embeddings [B, embedding_size]."""

    def __init__(
        self,
        layers: tuple[int, int, int, int],
        embedding_size: int = 512,
        dropout: float = 0.0,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        check_head_args(embedding_size, dropout)
        self.num_features = embedding_size
        self.feature_channels = WIDTHS[-1]
        self.conv1 = _conv3x3(3, WIDTHS[0])
        self.bn1 = nn.BatchNorm2d(WIDTHS[0], eps=BN_EPS)
        self.prelu = nn.PReLU(WIDTHS[0])
        cin = WIDTHS[0]
        for i, (depth, width) in enumerate(zip(layers, WIDTHS), start=1):
            blocks = [IBasicBlock(cin, width, stride=2)]
            blocks += [IBasicBlock(width, width, stride=1) for _ in range(depth - 1)]
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
            cin = width
        self.bn2 = nn.BatchNorm2d(cin, eps=BN_EPS)
        self.dropout = nn.Dropout(p=dropout)
        h, w = self.feature_size
        self.fc = nn.Linear(cin * h * w, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=BN_EPS)
        init_weights(self)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, IBasicBlock):
                    nn.init.zeros_(m.bn3.weight)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """images [B,3,112,112] -> feature map [B,512,7,7]."""
        self._check_input(x)
        x = self.prelu(self.bn1(self.conv1(x)))
        return self._run_stages(x, [self.layer1, self.layer2, self.layer3, self.layer4])

    def forward_head(self, feature_map: torch.Tensor) -> torch.Tensor:
        """feature map [B,512,7,7] -> embeddings [B,D] (BN2d-dropout-flatten-FC-BN1d)."""
        x = self.dropout(self.bn2(feature_map))
        x = torch.flatten(x, 1)
        return self.features(self.fc(x))


def _make(depth: int):
    def factory(embedding_size: int = 512, dropout: float = 0.0,
                zero_init_residual: bool = False) -> IResNet:
        return IResNet(LAYERS[depth], embedding_size, dropout, zero_init_residual)

    factory.__name__ = f"iresnet{depth}"
    factory.__doc__ = f"IResNet-{depth}, layers {list(LAYERS[depth])}."
    return BACKBONES.register(f"iresnet{depth}")(factory)


iresnet18 = _make(18)
iresnet34 = _make(34)
iresnet50 = _make(50)
iresnet100 = _make(100)
iresnet200 = _make(200)
