"""The backbone registry: `create_backbone(name, **kwargs)` and `list_backbones()`."""

from __future__ import annotations

import inspect

from torch import nn

from fr_trainer.registry import Registry

BACKBONES: Registry[nn.Module] = Registry("backbone")


def list_backbones() -> list[str]:
    """Names accepted by `create_backbone`, sorted."""
    return BACKBONES.names()


def create_backbone(name: str, **kwargs) -> nn.Module:
    """Build a registered backbone: `forward(images [B,3,112,112]) -> embeddings [B,D]`.

    Unknown names raise `ValueError` with the list of known names; unknown options raise
    `ValueError` with the options the backbone accepts (e.g. `embedding_size`, `dropout`).
    """
    factory = BACKBONES.get(name)
    params = inspect.signature(factory).parameters
    takes_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = sorted(set(kwargs) - set(params))
    if unknown and not takes_var_kw:
        accepted = ", ".join(p for p in params if params[p].kind is not inspect.Parameter.VAR_KEYWORD)
        raise ValueError(
            f"backbone {name!r} got unknown option(s) {', '.join(map(repr, unknown))}; "
            f"accepted: {accepted}"
        )
    model = factory(**kwargs)
    model.backbone_name = name  # for reports (ONNX export, benchmarks)
    return model
