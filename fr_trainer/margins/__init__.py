"""Margins, one small class per family, registered by name."""

from fr_trainer.margins.base import Margin
from fr_trainer.margins.registry import MARGINS, create_margin, list_margins, register_margin
from fr_trainer.margins import family as _family  # noqa: F401  (registers the classes)
from fr_trainer.margins.family import (
    ArcFace,
    Coco,
    Combined,
    CosFace,
    NormFace,
    Softmax,
    coco_alpha_lower_bound,
)

__all__ = [
    "MARGINS",
    "ArcFace",
    "Coco",
    "Combined",
    "CosFace",
    "Margin",
    "NormFace",
    "Softmax",
    "coco_alpha_lower_bound",
    "create_margin",
    "list_margins",
    "register_margin",
]
