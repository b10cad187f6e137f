"""What every backbone shares: the input check, stage-wise gradient checkpointing, init.

A backbone is `forward_features(x) -> [B, C, 7, 7]` followed by
`forward_head(feature_map) -> [B, D]`; `forward` is their composition. Subclasses list
their checkpointable stages in `self._stages` (run in order by `_run_stages`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

INPUT_SHAPE = (3, 112, 112)


def check_head_args(embedding_size: int, dropout: float) -> None:
    """The checks every backbone's constructor makes on its embedding head."""
    if embedding_size < 1:
        raise ValueError(f"embedding_size must be >= 1; got {embedding_size}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1); got {dropout}")


class FaceBackbone(nn.Module):
    """Base class: `num_features` (= D), `feature_channels` (= C), grad checkpointing."""

    num_features: int
    feature_channels: int
    feature_size: tuple[int, int] = (7, 7)

    def __init__(self) -> None:
        super().__init__()
        self.grad_checkpointing = False

    # -- interface -------------------------------------------------------------------
    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each stage in backward instead of storing its activations.

        Uses `torch.utils.checkpoint` (use_reentrant=False). Only active while autograd
        records (training); BatchNorm running statistics are updated once per step, not
        again during the recomputation, so checkpointing changes neither gradients nor
        running statistics.
        """
        self.grad_checkpointing = bool(enabled)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def forward_head(self, feature_map: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """images [B,3,112,112], normalised as (x/255-0.5)/0.5 -> embeddings [B,D]."""
        return self.forward_head(self.forward_features(x))

    # -- helpers for subclasses -------------------------------------------------------
    def _check_input(self, x: torch.Tensor) -> None:
        if torch.jit.is_tracing() or torch.jit.is_scripting():
            return
        if x.dim() != 4 or tuple(x.shape[1:]) != INPUT_SHAPE:
            raise ValueError(
                f"{type(self).__name__} expects images of shape [B, 3, 112, 112] "
                f"(aligned RGB faces, normalised as (x/255-0.5)/0.5); got {list(x.shape)}"
            )

    def _run_stages(self, x: torch.Tensor, stages: list[nn.Module]) -> torch.Tensor:
        use_ckpt = self.grad_checkpointing and torch.is_grad_enabled()
        for stage in stages:
            if use_ckpt:
                x = checkpoint(
                    stage,
                    x,
                    use_reentrant=False,
                    context_fn=lambda stage=stage: (
                        contextlib.nullcontext(),
                        _frozen_bn_stats(stage),
                    ),
                )
            else:
                x = stage(x)
        return x


@contextlib.contextmanager
def _frozen_bn_stats(module: nn.Module) -> Iterator[None]:
    """During checkpoint recomputation: same BatchNorm call, running stats left alone.

    Momentum 0 makes the in-place update `running = 1 * running + 0 * batch` (unchanged)
    while the kernel and the tensors it saves for backward stay exactly those of the first
    forward (which the non-reentrant checkpoint verifies); `num_batches_tracked`, which the
    module bumps in Python, is restored afterwards. Modules in eval mode are untouched.
    """
    saved = []
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats:
            saved.append((m, m.momentum, m.num_batches_tracked.clone()))
            m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum, count in saved:
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal convs (fan_out, gain sqrt(2)), BatchNorm weight 1 / bias 0; Linear and PReLU keep
    PyTorch's defaults (PReLU slope 0.25)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            # kaiming normal, fan_out mode, counting the fan of grouped (depthwise) convs
            # correctly: torch's own helper ignores groups and would shrink depthwise
            # filters by a factor sqrt(channels).
            kh, kw = m.kernel_size
            fan_out = m.out_channels // m.groups * kh * kw
            nn.init.normal_(m.weight, mean=0.0, std=math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def init_weights_upstream(model: nn.Module) -> None:
    """arcface_torch's iresnet initialisation: convs N(0, 0.1), BatchNorm2d weight 1 /
    bias 0, and the embedding BatchNorm1d (`features`) with its weight fixed at 1 and not
    trained. Linear and PReLU keep PyTorch's defaults."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, mean=0.0, std=0.1)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    features = getattr(model, "features", None)
    if isinstance(features, nn.BatchNorm1d) and features.affine:
        nn.init.ones_(features.weight)
        features.weight.requires_grad_(False)
