"""Face-recognition backbones: iresnet18/34/50/100/200, mobilefacenet, mbf, vit_t/s/b/l/h, vit_demo,
demonet, two-head wrapper.

    from fr_trainer.backbones import create_backbone, list_backbones
    model = create_backbone("iresnet50", embedding_size=512)
    emb = model(images)          # images [B,3,112,112] in [-1, 1] -> [B, 512]

Every backbone exposes `num_features` (D), `feature_channels` (C of the last feature map),
`set_grad_checkpointing(enabled)`, `forward_features(x) -> [B,C,7,7]` and
`forward_head(feature_map) -> [B,D]` (the ViTs: tokens [B,144,W] instead of the 7x7 map).
Precision, DDP and compile are applied by the trainer. `backbones.pretrained.load_pretrained`
loads arcface_torch's published weights.
"""

from fr_trainer.backbones import demonet as _demonet  # noqa: F401  (registers)
from fr_trainer.backbones import iresnet as _iresnet  # noqa: F401  (registers)
from fr_trainer.backbones import mobilefacenet as _mobilefacenet  # noqa: F401  (registers)
from fr_trainer.backbones import vit as _vit  # noqa: F401  (registers)
from fr_trainer.backbones.base import FaceBackbone
from fr_trainer.backbones.iresnet import IResNet
from fr_trainer.backbones.mobilefacenet import MobileFaceNet
from fr_trainer.backbones.profile import count_macs, count_parameters
from fr_trainer.backbones.registry import BACKBONES, create_backbone, list_backbones
from fr_trainer.backbones.two_head import TwoHeadBackbone
from fr_trainer.backbones.utils import recalibrate_batchnorm
from fr_trainer.backbones.vit import VisionTransformer

__all__ = [
    "BACKBONES",
    "FaceBackbone",
    "IResNet",
    "MobileFaceNet",
    "TwoHeadBackbone",
    "VisionTransformer",
    "count_macs",
    "count_parameters",
    "create_backbone",
    "list_backbones",
    "recalibrate_batchnorm",
]
