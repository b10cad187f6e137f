"""Margins, one small class per family, registered by name."""

from fr_trainer.margins import family as _family  # noqa: F401  (registers the classes)
from fr_trainer.margins import norm_aware as _norm_aware  # noqa: F401  (registers)
from fr_trainer.margins import others as _others  # noqa: F401  (registers)
from fr_trainer.margins import support_vector as _support_vector  # noqa: F401  (registers)
from fr_trainer.margins.base import Margin
from fr_trainer.margins.family import (
    ArcFace,
    Coco,
    Combined,
    CosFace,
    NormFace,
    Softmax,
    SubcenterArcFace,
    coco_alpha_lower_bound,
)
from fr_trainer.margins.norm_aware import AdaFace, MagFace
from fr_trainer.margins.others import CircleClassLevel, CurricularFace, SphereFace
from fr_trainer.margins.registry import MARGINS, create_margin, list_margins, register_margin
from fr_trainer.margins.support_vector import MVSoftmax, SupportVectorMargin, SVArcFace, SVCosFace, SVSoftmax

__all__ = [
    "MARGINS",
    "AdaFace",
    "MagFace",
    "ArcFace",
    "CircleClassLevel",
    "Coco",
    "Combined",
    "CosFace",
    "CurricularFace",
    "MVSoftmax",
    "Margin",
    "NormFace",
    "SVArcFace",
    "SVCosFace",
    "SVSoftmax",
    "Softmax",
    "SphereFace",
    "SubcenterArcFace",
    "SupportVectorMargin",
    "coco_alpha_lower_bound",
    "create_margin",
    "list_margins",
    "register_margin",
]
