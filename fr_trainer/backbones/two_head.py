"""Two-head wrapper for the triplet regularizer of Taha et al. 2020 ("Boosting
Standard Classification Architectures Through a Ranking Regularizer", WACV 2020).

The backbone's own head gives the embedding trained by the softmax/margin loss; a second
head, flatten(last feature map) - FC -> `second_dim`, L2-normalised, feeds the triplet
loss. At deployment only the first output is used (ONNX export unwraps the wrapper).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TwoHeadBackbone(nn.Module):
    """images [B,3,112,112] -> (embedding [B,D], second [B,second_dim] with unit L2 norm)."""

    def __init__(self, backbone: nn.Module, second_dim: int = 256) -> None:
        super().__init__()
        for attr in ("forward_features", "forward_head", "num_features"):
            if not hasattr(backbone, attr):
                raise TypeError(
                    f"TwoHeadBackbone needs a backbone with forward_features/forward_head/"
                    f"num_features (from create_backbone); {type(backbone).__name__} lacks {attr}"
                )
        if second_dim < 1:
            raise ValueError(f"second_dim must be >= 1; got {second_dim}")
        self.backbone = backbone
        self.num_features: int = backbone.num_features
        self.second_dim = second_dim
        h, w = getattr(backbone, "feature_size", (7, 7))
        channels = getattr(backbone, "feature_channels", None)
        if channels is None:
            raise TypeError(f"{type(backbone).__name__} does not declare feature_channels")
        self.second_head = nn.Linear(channels * h * w, second_dim)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enabled)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feature_map = self.backbone.forward_features(x)
        embedding = self.backbone.forward_head(feature_map)
        second = self.second_head(torch.flatten(feature_map, 1))
        return embedding, F.normalize(second, dim=1)
