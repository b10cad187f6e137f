"""`model.pretrained`: weights loaded into the freshly built backbone.

The source is either
- a published backbone state_dict file (arcface_torch's iresnet/mbf/ViT `.pth`, or any
  `torch.save(model.state_dict())`; see `fr_trainer.backbones.pretrained`), or
- one of our own training runs: a run directory, its `checkpoints/` folder, a
  `step_XXXXXXXX` folder, its `common.pt` or a merged checkpoint file. Its backbone
  weights are used (with `model.pretrained_ema = true`, the run's moving average of them);
  its head, optimizer state, schedule and data position are not: a fine-tuning run starts
  with a fresh head sized for its own classes and a fresh schedule.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fr_trainer.backbones.pretrained import PretrainedError, check_fits, load_pretrained
from fr_trainer.train import checkpoint as ckpt
from fr_trainer.train.config import ConfigError
from fr_trainer.train.load_errors import UNREADABLE, unreadable_message


def _our_common(path: Path) -> dict | None:
    """The common part of our training checkpoint at `path`, or None when `path` is a
    plain weights file."""
    if path.is_dir():
        return ckpt.load_common(ckpt.resolve_checkpoint(path))
    if not path.is_file():
        return None
    try:
        obj = ckpt.load_file(path)
    except UNREADABLE:
        return None  # not ours; the weights reader gives the message
    if isinstance(obj, dict) and obj.get("kind") == ckpt.MERGED_KIND:
        obj = obj.get("common")
    if isinstance(obj, dict) and "backbone_name" in obj and isinstance(obj.get("backbone"), dict):
        return obj
    return None


def checkpoint_backbone_state(path: Path, ema: bool) -> dict[str, torch.Tensor] | None:
    """The backbone (or EMA) weights of our training checkpoint at `path`; None when
    `path` is not one."""
    common = _our_common(path)
    if common is None:
        if ema:
            raise PretrainedError(f"{path} is not an fr_trainer training checkpoint: it has no EMA; "
                                  "set model.pretrained_ema = false")
        return None
    if not ema:
        return common["backbone"]
    if not common.get("ema"):
        raise PretrainedError(f"{path} has no EMA of the backbone (trained with model.ema_decay = 0); "
                              "set model.pretrained_ema = false")
    return common["ema"]["backbone"]


def load_configured_pretrained(backbone: nn.Module, path: str, ema: bool = False) -> None:
    """Load `path` (model.pretrained) into `backbone`; nothing when it is "". Every rank
    reads the same file, so the replicas start equal. A file that does not fit is a
    ConfigError naming the missing / unexpected / mis-shaped keys. A resumed run's
    checkpoint replaces these weights afterwards."""
    if not path:
        return
    source = Path(path)
    try:
        state = checkpoint_backbone_state(source, ema)
        if state is None:
            load_pretrained(backbone, source)
            return
        state = {k.removeprefix("module."): v for k, v in state.items()}
        check_fits(backbone, state, f"the backbone of checkpoint {source}")
        backbone.load_state_dict(state, strict=True)
    except PretrainedError as error:
        raise ConfigError(f"model.pretrained={path!r}: {error}") from None
    except UNREADABLE as error:
        raise ConfigError(f"model.pretrained={path!r}: {unreadable_message(source, error)}") from None
    except ckpt.CheckpointError as error:
        raise ConfigError(f"model.pretrained={path!r}: {error}") from None
