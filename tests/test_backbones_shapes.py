"""Backbone registry, output shapes, parameter/MAC counts vs published figures, two-head."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fr_trainer.backbones import (
    TwoHeadBackbone,
    count_macs,
    count_parameters,
    create_backbone,
    list_backbones,
)
from fr_trainer.backbones.iresnet import LAYERS

ALL = ["iresnet18", "iresnet34", "iresnet50", "iresnet100", "iresnet200", "mobilefacenet", "mbf"]


def meta_backbone(name: str, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return create_backbone(name, **kwargs)


def test_registry_lists_every_backbone():
    shipped = [name for name in list_backbones() if not name.startswith("test_")]  # tests may add their own
    vits = ["vit_t", "vit_s", "vit_b", "vit_l", "vit_h", "vit_demo"]  # tests/test_backbones_vit.py
    assert shipped == sorted([*ALL, "demonet", *vits])


def test_unknown_name_and_option_are_clear_errors():
    with pytest.raises(ValueError, match=r"unknown backbone 'resnet9'.*iresnet50"):
        create_backbone("resnet9")
    with pytest.raises(ValueError, match=r"unknown option\(s\) 'num_classes'.*embedding_size"):
        create_backbone("iresnet18", num_classes=10)
    with pytest.raises(ValueError, match="embedding_size"):
        meta_backbone("iresnet18", embedding_size=0)


@pytest.mark.parametrize("name", ALL)
def test_output_shape_and_interface(name):
    # shapes on the meta device (no arithmetic); real outputs of every backbone are
    # checked against onnxruntime in test_export_parity.py
    model = meta_backbone(name, embedding_size=128)
    assert model.num_features == 128 and model.backbone_name == name
    x = torch.empty(2, 3, 112, 112, device="meta")
    for mode in (True, False):
        model.train(mode)
        fmap = model.forward_features(x)
        assert fmap.shape == (2, model.feature_channels, 7, 7)
        assert model.forward_head(fmap).shape == (2, 128)
        assert model(x).shape == (2, 128)


def test_real_forward_is_finite_and_composed_of_features_and_head():
    torch.manual_seed(0)
    model = create_backbone("iresnet18", embedding_size=128).eval()
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        emb = model(x)
        assert emb.shape == (2, 128) and torch.isfinite(emb).all()
        torch.testing.assert_close(emb, model.forward_head(model.forward_features(x)))


def test_wrong_input_shape_names_expected_shape():
    model = create_backbone("mobilefacenet")
    with pytest.raises(ValueError, match=r"\[B, 3, 112, 112\].*got \[2, 112, 112, 3\]"):
        model(torch.zeros(2, 112, 112, 3))


def iresnet_params(layers, d=512) -> int:
    """Parameter count written out from the architecture description, layer by layer."""
    def bn(c):
        return 2 * c

    total = 9 * 3 * 64 + bn(64) + 64  # stem conv, BN, PReLU
    cin = 64
    for depth, width in zip(layers, (64, 128, 256, 512)):
        for i in range(depth):
            stride = 2 if i == 0 else 1
            total += bn(cin) + 9 * cin * width + bn(width) + width + 9 * width * width + bn(width)
            if stride != 1 or cin != width:
                total += cin * width + bn(width)
            cin = width
    return total + bn(512) + 512 * 49 * d + d + bn(d)


@pytest.mark.parametrize("depth", sorted(LAYERS))
def test_iresnet_parameter_count_matches_the_architecture(depth):
    assert count_parameters(meta_backbone(f"iresnet{depth}")) == iresnet_params(LAYERS[depth])


@pytest.mark.parametrize(
    "name, kwargs, params_m, gmacs",
    [
        # published figures: arcface_torch model zoo (r50 43.6M / 6.3G, r100 65.2M / 12.1G),
        # MobileFaceNet paper (128-d: 0.99M parameters, 221M MAdds)
        ("iresnet50", {}, 43.6, 6.3),
        ("iresnet100", {}, 65.2, 12.1),
        ("mobilefacenet", {"embedding_size": 128}, 0.99, 0.221),
        # arcface_torch's "mobilefacenet-0.45G": our conv+linear count is 0.4375G, 0.460G with
        # BN (2 per element) and PReLU (1) counted as ptflops does; no published parameter count
        ("mbf", {}, None, 0.45),
    ],
)
def test_counts_match_published_figures(name, kwargs, params_m, gmacs):
    model = meta_backbone(name, **kwargs)
    params, macs = count_parameters(model), count_macs(model)
    print(f"{name} {kwargs}: {params / 1e6:.3f}M parameters, {macs / 1e9:.3f} GMACs")
    if params_m is not None:
        assert params / 1e6 == pytest.approx(params_m, rel=0.015)
    assert macs / 1e9 == pytest.approx(gmacs, rel=0.015 if name != "mbf" else 0.03)


def test_mobilefacenet_512_is_about_a_million_parameters():
    params = count_parameters(meta_backbone("mobilefacenet"))
    assert 1.0e6 < params < 1.3e6  # 128-d paper model + 512x384 more in the last linear


def test_two_head_wrapper_shapes_normalisation_and_gradients():
    torch.manual_seed(0)
    backbone = create_backbone("mobilefacenet", embedding_size=64)
    model = TwoHeadBackbone(backbone, second_dim=256)
    assert model.num_features == 64
    x = torch.randn(3, 3, 112, 112)
    emb, second = model(x)
    assert emb.shape == (3, 64) and second.shape == (3, 256)
    assert torch.allclose(second.norm(dim=1), torch.ones(3), atol=1e-5)
    (emb.sum() + second[:, 0].sum()).backward()
    assert model.second_head.weight.grad is not None
    assert backbone.stem[0][0].weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(x)[0], backbone(x))
    model.set_grad_checkpointing(True)
    assert backbone.grad_checkpointing


def test_two_head_rejects_a_plain_module():
    with pytest.raises(TypeError, match="forward_features"):
        TwoHeadBackbone(nn.Linear(3, 3))
