"""`model.pretrained`: published backbone weights loaded into the freshly built backbone."""

from __future__ import annotations

from torch import nn

from fr_trainer.backbones.pretrained import PretrainedError, load_pretrained
from fr_trainer.train.config import ConfigError


def load_configured_pretrained(backbone: nn.Module, path: str) -> None:
    """Load `path` (model.pretrained) into `backbone`; nothing when it is "". Every rank
    reads the same file, so the replicas start equal. A file that does not fit is a
    ConfigError naming the missing / unexpected / mis-shaped keys. A resumed run's
    checkpoint replaces these weights afterwards."""
    if not path:
        return
    try:
        load_pretrained(backbone, path)
    except PretrainedError as error:
        raise ConfigError(f"model.pretrained={path!r}: {error}") from None
