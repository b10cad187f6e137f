"""ViT backbones: layouts, parameter/MAC counts vs arcface_torch's published figures, key
names, attention through SDPA equal to a plain attention, drop-path, token masking,
gradient checkpointing, bf16."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fr_trainer.backbones import count_macs, count_parameters, create_backbone
from fr_trainer.backbones.vit import Attention, DropPath, VisionTransformer

# width, depth, heads as published in arcface_torch's get_model (vit_t/s/b/l/h)
LAYOUTS = {"vit_t": (256, 12, 8), "vit_s": (512, 12, 8), "vit_b": (512, 24, 8),
           "vit_l": (768, 24, 8), "vit_h": (1024, 48, 8)}
N = 144  # (112 // 9) ** 2 tokens


def meta(name: str, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return create_backbone(name, **kwargs)


def vit_params(w: int, depth: int, d: int = 512) -> int:
    """Parameter count written out from the layout."""
    patch = 3 * 9 * 9 * w + w
    block = 2 * w + 3 * w * w + (w * w + w) + 2 * w + (4 * w * w + 4 * w) + (4 * w * w + w)
    head = N * w * w + 2 * w + w * d + 2 * d
    return patch + N * w + w + depth * block + 2 * w + head


def expected_keys(w: int, depth: int, d: int = 512) -> dict[str, tuple[int, ...]]:
    """The state_dict of arcface_torch's VisionTransformer (LayerNorm, patch 9, 112x112), by
    name and shape, written out from its module structure."""
    keys: dict[str, tuple[int, ...]] = {
        "pos_embed": (1, N, w),
        "mask_token": (1, 1, w),
        "patch_embed.proj.weight": (w, 3, 9, 9),
        "patch_embed.proj.bias": (w,),
    }
    for i in range(depth):
        p = f"blocks.{i}."
        keys.update({
            p + "norm1.weight": (w,), p + "norm1.bias": (w,),
            p + "attn.qkv.weight": (3 * w, w),
            p + "attn.proj.weight": (w, w), p + "attn.proj.bias": (w,),
            p + "norm2.weight": (w,), p + "norm2.bias": (w,),
            p + "mlp.fc1.weight": (4 * w, w), p + "mlp.fc1.bias": (4 * w,),
            p + "mlp.fc2.weight": (w, 4 * w), p + "mlp.fc2.bias": (w,),
        })
    keys.update({"norm.weight": (w,), "norm.bias": (w,), "feature.0.weight": (w, N * w),
                 "feature.2.weight": (d, w)})
    for idx, c in (("1", w), ("3", d)):
        keys.update({f"feature.{idx}.weight": (c,), f"feature.{idx}.bias": (c,),
                     f"feature.{idx}.running_mean": (c,), f"feature.{idx}.running_var": (c,),
                     f"feature.{idx}.num_batches_tracked": ()})
    return keys


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_parameter_count_and_state_dict_keys_follow_the_layout(name):
    w, depth, heads = LAYOUTS[name]
    model = meta(name)
    assert count_parameters(model) == vit_params(w, depth)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected_keys(w, depth)
    assert model.blocks[0].attn.heads == heads
    assert model.feature[1].eps == model.feature[3].eps == 2e-5


@pytest.mark.parametrize("name, gflops", [("vit_t", 1.5), ("vit_s", 5.7), ("vit_b", 11.4), ("vit_l", 25.3)])
def test_macs_match_arcface_torch_published_flops(name, gflops):
    # docs/modelzoo.md of arcface_torch, "ViT For Face Recognition": 1.5 / 5.7 / 11.4 / 25.3 G
    # (ptflops' Conv/Linear count plus the attention products, `extra_gflops`)
    macs = count_macs(meta(name))
    w, depth, _ = LAYOUTS[name]
    attention = depth * 2 * N * N * w
    linear = N * w * 243 + depth * N * 12 * w * w + N * w * w + w * 512
    assert macs == attention + linear
    assert macs / 1e9 == pytest.approx(gflops, rel=0.01)


def test_tokens_embedding_shapes_and_head_composition():
    torch.manual_seed(0)
    model = create_backbone("vit_demo", embedding_size=64)
    assert model.feature_size == (12, 12) and model.feature_channels == 128
    x = torch.randn(3, 3, 112, 112)
    for mode in (True, False):
        model.train(mode)
        torch.manual_seed(1)
        tokens = model.forward_features(x)
        assert tokens.shape == (3, N, 128)
        torch.manual_seed(1)
        emb = model(x)
        assert emb.shape == (3, 64) and torch.isfinite(emb).all()
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.forward_head(model.forward_features(x)))
    with pytest.raises(ValueError, match=r"\[B, 3, 112, 112\]"):
        model(torch.zeros(2, 3, 108, 108))


def plain_attention(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v written out, from the module's weights."""
    b, n, w = x.shape
    h = attn.heads
    qkv = x @ attn.qkv.weight.t()
    q, k, v = (qkv[..., i * w:(i + 1) * w].reshape(b, n, h, w // h).transpose(1, 2) for i in range(3))
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(w // h)
    out = scores.softmax(-1) @ v
    return out.transpose(1, 2).reshape(b, n, w) @ attn.proj.weight.t() + attn.proj.bias


def test_sdpa_attention_equals_plain_attention_values_and_gradients():
    torch.manual_seed(0)
    attn = Attention(64, heads=8).double()
    x = torch.randn(2, N, 64, dtype=torch.float64, requires_grad=True)
    got = attn(x)
    x2 = x.detach().clone().requires_grad_(True)
    ref = plain_attention(attn, x2)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(got)
    (gx,) = torch.autograd.grad(got, x, g)
    (gx2,) = torch.autograd.grad(ref, x2, g)
    torch.testing.assert_close(gx, gx2, rtol=1e-10, atol=1e-12)


def test_drop_path_drops_whole_samples_and_keeps_the_mean():
    torch.manual_seed(0)
    dp = DropPath(0.25)
    x = torch.ones(4000, 3, 5)
    y = dp(x)
    per_sample = y.reshape(4000, -1)
    assert ((per_sample == 0).all(1) | (per_sample == 1 / 0.75).all(1)).all()
    dropped = (per_sample == 0).all(1).float().mean().item()
    assert dropped == pytest.approx(0.25, abs=0.03)
    assert y.mean().item() == pytest.approx(1.0, abs=0.05)
    dp.eval()
    assert torch.equal(dp(x), x)


def test_stochastic_depth_rule_is_linear_over_blocks():
    model = meta("vit_t", drop_path_rate=0.1)
    rates = [b.drop_path.p for b in model.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.1)
    assert rates == pytest.approx([0.1 * i / 11 for i in range(12)])


def test_token_masking_puts_mask_token_at_dropped_positions_in_training_only():
    torch.manual_seed(0)
    model = create_backbone("vit_demo", mask_ratio=0.25)
    x = torch.randn(2, 3, 112, 112)
    model.train()
    tokens = model.forward_features(x)
    is_mask = (tokens == model.mask_token).all(-1)
    assert is_mask.sum(1).tolist() == [N - int(N * 0.75)] * 2
    assert not torch.equal(is_mask[0], is_mask[1])  # a different random set per image
    model.eval()
    with torch.no_grad():
        assert not (model.forward_features(x) == model.mask_token).all(-1).any()


def test_grad_checkpointing_gives_the_same_gradients_with_drop_path_and_masking():
    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = create_backbone("vit_demo", drop_path_rate=0.3, mask_ratio=0.1, depth=2).double()
        model.set_grad_checkpointing(checkpointing)
        x = torch.randn(3, 3, 112, 112, dtype=torch.float64)
        torch.manual_seed(5)
        model(x).pow(2).sum().backward()
        return {k: p.grad for k, p in model.named_parameters()}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys()
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], rtol=1e-10, atol=1e-12, msg=k)


def test_bf16_autocast_and_bf16_weights_track_fp32():
    torch.manual_seed(0)
    model = create_backbone("vit_demo", depth=2).eval()
    x = torch.randn(3, 3, 112, 112)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = model(x)
        half = model.to(torch.bfloat16)(x.bfloat16())
    for got in (auto, half):
        assert got.dtype == torch.bfloat16
        assert F.cosine_similarity(got.float(), ref, dim=1).min() > 0.99
    model.float().train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x).float().pow(2).mean()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_bad_layout_values_are_clear_errors():
    with pytest.raises(ValueError, match="not divisible by heads"):
        VisionTransformer(100, 2, 8)
    with pytest.raises(ValueError, match="mask_ratio"):
        create_backbone("vit_demo", mask_ratio=1.0)
    with pytest.raises(ValueError, match="drop_path_rate"):
        create_backbone("vit_demo", drop_path_rate=-0.1)


@pytest.mark.parametrize("mask_ratio", [0.0, 0.2])
def test_every_trainable_parameter_gets_a_gradient_so_ddp_needs_no_unused_detection(mask_ratio):
    torch.manual_seed(0)
    model = create_backbone("vit_demo", depth=1, mask_ratio=mask_ratio).train()
    assert "mask_token" in model.state_dict()  # kept for arcface_torch's checkpoints either way
    assert model.mask_token.requires_grad == (mask_ratio > 0)
    model(torch.randn(2, 3, 112, 112)).sum().backward()
    no_grad = [k for k, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []


def test_two_head_wrapper_takes_the_tokens():
    from fr_trainer.backbones import TwoHeadBackbone

    torch.manual_seed(0)
    model = TwoHeadBackbone(create_backbone("vit_demo", embedding_size=32, depth=1), second_dim=16)
    assert model.second_head.in_features == N * 128
    emb, second = model(torch.randn(2, 3, 112, 112))
    assert emb.shape == (2, 32) and second.shape == (2, 16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (fused flash / memory-efficient kernels)")
@pytest.mark.parametrize("backend", ["FLASH_ATTENTION", "EFFICIENT_ATTENTION"])
def test_fused_gpu_kernels_match_plain_attention_in_bf16(backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    attn = Attention(768, heads=8).cuda()  # vit_l's head size, 96
    x = torch.randn(4, N, 768, device="cuda")
    with torch.no_grad():
        ref = plain_attention(attn, x)
        with sdpa_kernel(getattr(SDPBackend, backend)), torch.autocast("cuda", dtype=torch.bfloat16):
            got = attn(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref, rtol=0.05, atol=0.02)
