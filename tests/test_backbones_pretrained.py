"""`model.pretrained`: files with arcface_torch's published key names and shapes (iresnet,
MobileFaceNet `mbf`, ViT) load into our backbones; anything else is a clear error.

The files are built here from key lists written out from arcface_torch's module
structure (names and shapes only), filled with random tensors."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from test_backbones_vit import expected_keys as vit_keys
from test_train_support import config_dict, make_data, make_trainer

from fr_trainer.backbones import create_backbone
from fr_trainer.backbones.iresnet import LAYERS
from fr_trainer.backbones.pretrained import (
    PretrainedError,
    convert_arcface_mbf,
    load_pretrained,
    mismatches,
)
from fr_trainer.train.config import ConfigError

Shapes = dict[str, tuple[int, ...]]


def bn(prefix: str, c: int) -> Shapes:
    return {f"{prefix}weight": (c,), f"{prefix}bias": (c,), f"{prefix}running_mean": (c,),
            f"{prefix}running_var": (c,), f"{prefix}num_batches_tracked": ()}


def upstream_iresnet_keys(layers: tuple[int, ...], d: int = 512) -> Shapes:
    """arcface_torch IResNet: conv1, bn1, prelu, layer1..4 of IBasicBlocks (bn1, conv1, bn2,
    prelu, conv2, bn3, downsample.0/.1 on the first block of each layer), bn2, fc, features."""
    keys: Shapes = {"conv1.weight": (64, 3, 3, 3), **bn("bn1.", 64), "prelu.weight": (64,)}
    cin = 64
    for i, (n, w) in enumerate(zip(layers, (64, 128, 256, 512)), start=1):
        for j in range(n):
            p = f"layer{i}.{j}."
            keys.update({**bn(p + "bn1.", cin), p + "conv1.weight": (w, cin, 3, 3), **bn(p + "bn2.", w),
                         p + "prelu.weight": (w,), p + "conv2.weight": (w, w, 3, 3), **bn(p + "bn3.", w)})
            if j == 0:
                keys.update({p + "downsample.0.weight": (w, cin, 1, 1), **bn(p + "downsample.1.", w)})
            cin = w
    keys.update({**bn("bn2.", 512), "fc.weight": (d, 512 * 49), "fc.bias": (d,), **bn("features.", d)})
    return keys


def conv_block(prefix: str, cin: int, cout: int, k: int, groups: int = 1, prelu: bool = True) -> Shapes:
    """arcface_torch ConvBlock / LinearBlock: layers.0 conv (no bias), layers.1 BN, layers.2 PReLU."""
    keys = {f"{prefix}layers.0.weight": (cout, cin // groups, k, k), **bn(f"{prefix}layers.1.", cout)}
    if prelu:
        keys[f"{prefix}layers.2.weight"] = (cout,)
    return keys


def depthwise(prefix: str, cin: int, cout: int, hidden: int) -> Shapes:
    """arcface_torch DepthWise: 1x1 ConvBlock to `hidden`, 3x3 depthwise ConvBlock, 1x1 LinearBlock."""
    return {**conv_block(prefix + "layers.0.", cin, hidden, 1),
            **conv_block(prefix + "layers.1.", hidden, hidden, 3, groups=hidden),
            **conv_block(prefix + "layers.2.", hidden, cout, 1, prelu=False)}


def upstream_mbf_keys(d: int = 512) -> Shapes:
    """arcface_torch get_mbf(blocks=(1, 4, 6, 2), scale=2)."""
    keys = {**conv_block("layers.0.", 3, 128, 3), **conv_block("layers.1.", 128, 128, 3, groups=64),
            **depthwise("layers.2.", 128, 128, 128)}
    for i in range(4):
        keys.update(depthwise(f"layers.3.layers.{i}.", 128, 128, 128))
    keys.update(depthwise("layers.4.", 128, 256, 256))
    for i in range(6):
        keys.update(depthwise(f"layers.5.layers.{i}.", 256, 256, 256))
    keys.update(depthwise("layers.6.", 256, 256, 512))
    for i in range(2):
        keys.update(depthwise(f"layers.7.layers.{i}.", 256, 256, 256))
    keys.update(conv_block("conv_sep.", 256, 512, 1))
    keys.update(conv_block("features.layers.0.", 512, 512, 7, groups=512, prelu=False))
    keys.update({"features.layers.2.weight": (d, 512), **bn("features.layers.3.", d)})
    return keys


def random_state(shapes: Shapes, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    def tensor(k: str, s: tuple[int, ...]) -> torch.Tensor:
        if k.endswith("num_batches_tracked"):
            return torch.randint(0, 100, s, generator=g)
        if k.endswith("running_var"):
            return torch.rand(s, generator=g) + 0.5
        return torch.randn(s, generator=g)

    return {k: tensor(k, s) for k, s in shapes.items()}


def meta_state(shapes: Shapes) -> dict[str, torch.Tensor]:
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def meta(name: str) -> torch.nn.Module:
    with torch.device("meta"):
        return create_backbone(name)


@pytest.mark.parametrize("depth", sorted(LAYERS))
def test_upstream_iresnet_keys_and_shapes_are_ours(depth):
    assert mismatches(meta(f"iresnet{depth}"), meta_state(upstream_iresnet_keys(LAYERS[depth]))) == ([], [], [])


@pytest.mark.parametrize("name", ["vit_t", "vit_s", "vit_b", "vit_l", "vit_h"])
def test_upstream_vit_keys_and_shapes_are_ours(name):
    model = meta(name)
    width, depth = model.feature_channels, len(model.blocks)
    assert mismatches(model, meta_state(vit_keys(width, depth))) == ([], [], [])


def test_iresnet18_file_loads_every_tensor(tmp_path):
    state = random_state(upstream_iresnet_keys(LAYERS[18]))
    path = tmp_path / "backbone.pth"
    torch.save(state, path)
    model = create_backbone("iresnet18")
    assert load_pretrained(model, path) == len(state)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_vit_checkpoint_with_ddp_prefix_and_wrapper_loads(tmp_path):
    model = create_backbone("vit_t", depth=2)  # the full key list is checked above on meta
    state = random_state(vit_keys(256, 2), seed=1)
    path = tmp_path / "checkpoint_gpu_0.pt"
    torch.save({"epoch": 3, "state_dict_backbone": {f"module.{k}": v.half() if v.is_floating_point() else v
                                                    for k, v in state.items()}}, path)
    load_pretrained(model, path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k].half().to(v.dtype) if v.is_floating_point() else state[k]), k


def test_mbf_converter_maps_all_333_keys_onto_ours_with_their_shapes():
    upstream = upstream_mbf_keys()
    assert len(upstream) == 333
    converted = convert_arcface_mbf(meta_state(upstream))
    ours = {k: tuple(v.shape) for k, v in meta("mbf").state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == ours
    # a few mappings checked by hand
    sample = {
        "layers.0.layers.0.weight": "stem.0.0.weight",
        "layers.1.layers.2.weight": "stem.1.2.weight",
        "layers.2.layers.1.layers.0.weight": "stages.0.0.block.1.0.weight",
        "layers.3.layers.3.layers.2.layers.1.running_var": "stages.0.4.block.2.1.running_var",
        "layers.4.layers.0.layers.0.weight": "stages.1.0.block.0.0.weight",
        "layers.5.layers.5.layers.1.layers.2.weight": "stages.2.5.block.1.2.weight",
        "layers.6.layers.2.layers.0.weight": "stages.3.0.block.2.0.weight",
        "layers.7.layers.1.layers.0.layers.1.bias": "stages.4.1.block.0.1.bias",
        "conv_sep.layers.2.weight": "conv_out.2.weight",
        "features.layers.0.layers.0.weight": "gdc.0.weight",
        "features.layers.2.weight": "linear.weight",
        "features.layers.3.running_mean": "features.running_mean",
    }
    state = random_state(upstream)
    conv = convert_arcface_mbf(state)
    for old, new in sample.items():
        assert conv[new] is state[old]


def test_mbf_file_loads_into_mbf_and_is_rejected_by_the_paper_mobilefacenet(tmp_path):
    state = random_state(upstream_mbf_keys(), seed=2)
    path = tmp_path / "mbf.pt"
    torch.save(state, path)
    model = create_backbone("mbf")
    load_pretrained(model, path)
    assert torch.equal(model.stages[2][5].block[1][2].weight, state["layers.5.layers.5.layers.1.layers.2.weight"])
    assert torch.equal(model.linear.weight, state["features.layers.2.weight"])
    converted = convert_arcface_mbf(state)
    assert all(torch.equal(v, converted[k]) for k, v in model.state_dict().items())

    paper = create_backbone("mobilefacenet")
    before = {k: v.clone() for k, v in paper.state_dict().items()}
    with pytest.raises(PretrainedError, match=r"wrong shape: stem\.0\.0\.weight \[128, 3, 3, 3\] "
                                              r"\(expected \[64, 3, 3, 3\]\).*model\.backbone = 'mbf'"):
        load_pretrained(paper, path)
    assert all(torch.equal(v, before[k]) for k, v in paper.state_dict().items())  # untouched


def test_wrong_depth_lists_unexpected_and_missing_keys_with_counts(tmp_path):
    path = tmp_path / "r50.pth"
    torch.save(random_state(upstream_iresnet_keys(LAYERS[50])), path)
    with pytest.raises(PretrainedError) as info:
        load_pretrained(create_backbone("iresnet18"), path)
    msg = str(info.value)
    assert "does not fit backbone 'iresnet18'" in msg and str(path) in msg
    extra = len(upstream_iresnet_keys(LAYERS[50])) - len(upstream_iresnet_keys(LAYERS[18]))
    assert f"{extra} unexpected: layer1.2.bn1.weight" in msg and f"({extra} in all)" in msg
    assert "blocks [3, 4, 14, 3]" in msg

    state = random_state(upstream_iresnet_keys(LAYERS[18]))
    del state["fc.bias"]
    state["fc.extra"] = torch.zeros(1)
    torch.save(state, path)
    with pytest.raises(PretrainedError, match=r"1 missing: fc\.bias; 1 unexpected: fc\.extra"):
        load_pretrained(create_backbone("iresnet18"), path)


def test_embedding_size_mismatch_names_the_fix(tmp_path):
    path = tmp_path / "r18_256.pth"
    torch.save(random_state(upstream_iresnet_keys(LAYERS[18], d=256)), path)
    with pytest.raises(PretrainedError, match=r"fc\.weight \[256, 25088\].*model\.embedding_size = 256"):
        load_pretrained(create_backbone("iresnet18"), path)


class Trap:
    """Unpickling it would create `marker` (what an arbitrary pickle could do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_unreadable_files_are_clear_errors_and_nothing_is_unpickled(tmp_path):
    model = create_backbone("demonet")
    with pytest.raises(PretrainedError, match="do not exist"):
        load_pretrained(model, tmp_path / "nope.pth")
    path = tmp_path / "obj.pth"
    with open(path, "wb") as f:
        pickle.dump({"x": Trap(tmp_path / "marker")}, f)
    with pytest.raises(PretrainedError, match="not a torch.save'd state_dict"):
        load_pretrained(model, path)
    assert not (tmp_path / "marker").exists()
    torch.save({"lr": 0.1}, path)
    with pytest.raises(PretrainedError, match="does not hold a state_dict"):
        load_pretrained(model, path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("pretrained_data"))


def test_trainer_loads_model_pretrained_and_reports_a_misfit_as_config_error(data, tmp_path):
    torch.manual_seed(7)
    source = create_backbone("demonet", embedding_size=16)
    path = tmp_path / "demonet.pth"
    torch.save(source.state_dict(), path)
    cfg = config_dict(data, tmp_path / "runs", model={"backbone": "demonet", "embedding_size": 16,
                                                       "pretrained": str(path)})
    trainer = make_trainer(0, 1, cfg)
    for k, v in trainer.backbone.state_dict().items():
        assert torch.equal(v, source.state_dict()[k]), k

    cfg["model"]["embedding_size"] = 32
    cfg["run"]["name"] = "misfit"
    with pytest.raises(ConfigError, match=r"model\.pretrained=.*demonet\.pth.*features\.weight \[16\]"):
        make_trainer(0, 1, cfg)


def test_config_rejects_padded_path(tmp_path):
    from fr_trainer.train.config import load_config

    with pytest.raises(ConfigError, match="model.pretrained"):
        load_config(None, [f'model.pretrained=" {Path(tmp_path)}"'])
