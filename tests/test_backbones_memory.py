"""channels_last gives the contiguous result; gradient checkpointing changes nothing
(gradients, running statistics) and really recomputes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fr_trainer.backbones import create_backbone


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial running stats and affine params, so eval mode is a real test."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) * 0.5 + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.1)


# one IResNet depth suffices: all depths are the same class and blocks
@pytest.mark.parametrize("name", ["iresnet18", "mobilefacenet"])
def test_channels_last_matches_contiguous_in_eval(name):
    torch.manual_seed(0)
    model = create_backbone(name).eval()
    with torch.no_grad():
        randomize_batchnorm(model)
        x = torch.randn(2, 3, 112, 112)
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.contiguous(memory_format=torch.channels_last))
    scale = ref.abs().max().clamp_min(1.0)
    assert out.shape == ref.shape
    assert ((out - ref).abs().max() / scale) < 1e-4


def _train_step(model: nn.Module, x: torch.Tensor):
    out = model(x)
    (out * torch.linspace(-1, 1, out.shape[1])).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    return out.detach(), grads, x.grad.clone(), buffers


@pytest.mark.parametrize("name", ["iresnet18", "mobilefacenet"])
def test_grad_checkpointing_gives_the_same_gradients(name):
    torch.manual_seed(0)
    model = create_backbone(name, embedding_size=64).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 112, 112)

    plain = _train_step(model, x.clone().requires_grad_())

    model.load_state_dict(state)
    model.zero_grad(set_to_none=True)
    model.set_grad_checkpointing(True)
    calls = []
    stage = model.layer3 if name.startswith("iresnet") else model.stages[2]
    handle = stage.register_forward_pre_hook(lambda *_: calls.append(1))
    ckpt = _train_step(model, x.clone().requires_grad_())
    handle.remove()
    assert len(calls) == 2, "the checkpointed stage must run again in backward"

    torch.testing.assert_close(ckpt[0], plain[0], rtol=0, atol=0)
    for n in plain[1]:
        torch.testing.assert_close(ckpt[1][n], plain[1][n], rtol=1e-5, atol=1e-7, msg=n)
    torch.testing.assert_close(ckpt[2], plain[2], rtol=1e-5, atol=1e-9)
    # running statistics are updated once, not again by the recomputation
    for n in plain[3]:
        torch.testing.assert_close(ckpt[3][n], plain[3][n], rtol=0, atol=0, msg=n)


def test_grad_checkpointing_is_off_without_autograd():
    model = create_backbone("mobilefacenet").eval()
    model.set_grad_checkpointing(True)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 112, 112)).shape == (1, 512)
