"""arcface_torch's recipe, reproduced: straight-through ArcFace without the fall-back, dense
updates of a sampled head, backbone-only clipping, their initialisation, the upstream
configs; and the GPU-step options (DDP settings and compression, channels_last, compile)
equal the plain step on CPU."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_train_support import config_dict, make_trainer

from fr_trainer.backbones import create_backbone
from fr_trainer.backbones.base import init_weights_upstream
from fr_trainer.distributed.spawn import run_ranks
from fr_trainer.heads import PartialFC
from fr_trainer.heads.update import densify
from fr_trainer.train.config import load_config
from fr_trainer.train.optim import SGD

ROOT = Path(__file__).resolve().parents[1]


def test_straight_through_arcface_without_fallback_is_arcface_torchs_loss():
    torch.manual_seed(0)
    s, m, classes = 64.0, 0.5, 10
    weight = torch.randn(classes, 8, dtype=torch.float64)
    x = torch.randn(6, 8, dtype=torch.float64)
    labels = torch.tensor([0, 3, 3, 7, 9, 1])
    x[0] = -weight[0] + 0.05 * torch.randn(8, dtype=torch.float64)  # theta + m > pi
    head = PartialFC(classes, 8, margin="arcface", s=s, m=m, gradient="straight_through", fallback=False)
    head = head.double()
    with torch.no_grad():
        head.weight.copy_(weight)
    xa = x.clone().requires_grad_(True)
    loss = head(xa, labels)
    loss.backward()

    # the upstream computation: cosines, the margin applied to the values only (no grad
    # through arccos/cos), then s * logits into the cross-entropy
    xb, wb = x.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    cos = F.normalize(xb, dim=1) @ F.normalize(wb, dim=1).t()
    with torch.no_grad():
        theta = torch.acos(cos.gather(1, labels[:, None]).clamp(-1, 1))
        shifted = cos.scatter(1, labels[:, None], torch.cos(theta + m))
    logits = s * (cos + (shifted - cos).detach())
    expected = F.cross_entropy(logits, labels)
    expected.backward()
    cos0 = float(cos[0, 0].detach())
    assert cos0 < math.cos(math.pi - m)  # where our default would fall back
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(head.weight.grad, wb.grad, rtol=1e-8, atol=1e-10)


def test_dense_update_of_a_sampled_head_is_torch_sgd_on_the_dense_gradient():
    torch.manual_seed(1)
    head = PartialFC(40, 8, margin="cosface", sample_rate=0.25, seed=0).double()
    reference = head.weight.detach().clone().requires_grad_(True)
    ours = SGD(head.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    torch_sgd = torch.optim.SGD([reference], lr=0.1, momentum=0.9, weight_decay=5e-4)
    unsampled_rows_moved = False
    for _ in range(3):
        x, labels = torch.randn(4, 8, dtype=torch.float64), torch.randint(0, 40, (4,))
        before = head.weight.detach().clone()
        head(x, labels).backward()
        assert head.weight.grad.is_sparse
        sampled = head.weight.grad.coalesce().indices()[0]
        densify(head)
        reference.grad = head.weight.grad.clone()
        ours.step()
        torch_sgd.step()
        ours.zero_grad(set_to_none=True)
        untouched = torch.ones(40, dtype=torch.bool)
        untouched[sampled] = False
        unsampled_rows_moved |= bool((head.weight.detach()[untouched] != before[untouched]).all())
        torch.testing.assert_close(head.weight.detach(), reference.detach(), rtol=1e-12, atol=1e-14)
    assert unsampled_rows_moved  # weight decay and momentum reach rows outside the sample


@pytest.mark.parametrize("update", ["sparse", "dense"])
def test_head_update_setting_reaches_the_trainer(data, tmp_path, update):
    cfg = config_dict(data, tmp_path, head={"sample_rate": 0.25, "update": update}, train={"max_steps": 1})
    trainer = make_trainer(0, 1, cfg)
    before = trainer.head.weight.detach().clone()
    trainer.fit()
    moved = (trainer.head.weight.detach() != before).all(dim=1)
    assert bool(moved.all()) == (update == "dense")


def _after_one_step(data, out, optim: dict) -> dict:
    trainer = make_trainer(0, 1, config_dict(data, out, optim=optim, train={"max_steps": 1}))
    trainer.fit()
    return trainer.state_snapshot()


def test_clip_scope_backbone_leaves_the_head_unclipped(data, tmp_path):
    free = _after_one_step(data, tmp_path / "free", {"clip_grad_norm": 0.0})
    backbone_only = _after_one_step(data, tmp_path / "bb", {"clip_grad_norm": 1e-3, "clip_scope": "backbone"})
    everything = _after_one_step(data, tmp_path / "all", {"clip_grad_norm": 1e-3, "clip_scope": "all"})
    assert torch.equal(backbone_only["head"], free["head"])
    assert not torch.equal(everything["head"], free["head"])
    weight = "linear.weight"
    assert not torch.equal(backbone_only["backbone"][weight], free["backbone"][weight])


def test_upstream_init_freezes_the_embedding_batchnorm_weight():
    torch.manual_seed(0)
    model = create_backbone("iresnet18", embedding_size=64)
    init_weights_upstream(model)
    assert not model.features.weight.requires_grad and bool((model.features.weight == 1).all())
    conv = model.layer2[0].conv1.weight
    assert conv.std().item() == pytest.approx(0.1, rel=0.05)


@pytest.mark.parametrize("name", ["ms1mv3_r50", "ms1mv3_r100", "glint360k_r100", "wf42m_pfc02_r100"])
def test_upstream_configs_carry_arcface_torchs_settings(name):
    c = load_config(ROOT / "configs" / "upstream" / f"{name}.toml")
    assert (c.run.seed, c.data.batch_size, c.optim.lr, c.optim.momentum) == (2048, 128, 0.1, 0.9)
    assert (c.optim.power, c.optim.warmup_epochs, c.train.epochs) == (1.0, 0.0, 20.0)
    assert (c.optim.clip_grad_norm, c.optim.clip_scope, c.head.update) == (5.0, "backbone", "dense")
    assert (c.train.precision, c.train.scaler_growth_interval, c.model.init) == ("fp16", 100, "upstream")
    d = c.ddp
    assert (d.broadcast_buffers, d.bucket_cap_mb, d.comm_hook, d.static_graph) == (False, 16, "fp16", True)
    if c.head.margin == "arcface":
        assert c.head.margin_args == {"s": 64.0, "m": 0.5, "gradient": "straight_through", "fallback": False}
    else:
        assert c.head.margin_args == {"s": 64.0, "m": 0.4}
    assert c.head.sample_rate == (0.2 if name.startswith("wf42m") else 1.0)


def rank_ddp_settings(rank: int, world_size: int, cfg: dict) -> dict:
    trainer = make_trainer(rank, world_size, cfg)
    summary = trainer.fit()
    model = trainer.model
    return {
        "losses": summary["losses"],
        "settings": (model.broadcast_buffers, model.gradient_as_bucket_view, model.static_graph),
        "bucket_bytes": model.bucket_bytes_cap,
    }


def test_ddp_settings_and_fp16_gradient_compression_train_like_plain_ddp(data, tmp_path):
    plain = run_ranks(rank_ddp_settings, 2, config_dict(data, tmp_path / "plain", train={"max_steps": 4}))
    tuned = {"bucket_cap_mb": 1.0, "static_graph": True, "comm_hook": "fp16", "broadcast_buffers": False}
    hooked = run_ranks(rank_ddp_settings, 2, config_dict(data, tmp_path / "hooked", train={"max_steps": 4}, ddp=tuned))
    assert hooked[0]["settings"] == (False, True, True) and hooked[0]["bucket_bytes"] == 1024 * 1024
    assert plain[0]["settings"] == (False, True, False)
    torch.testing.assert_close(torch.tensor(hooked[0]["losses"]), torch.tensor(plain[0]["losses"]), rtol=2e-3, atol=0)
    assert hooked[0]["losses"] != plain[0]["losses"]  # the compression did act


def _losses(data, out, model: dict, backbone: str = "demonet") -> tuple[list[float], torch.nn.Module]:
    """Three fp64 steps (so that reordered arithmetic stays far below the tolerance)."""
    cfg = config_dict(data, out, model={"backbone": backbone, "embedding_size": 16, **model},
                      train={"max_steps": 3, "precision": "fp64"})
    trainer = make_trainer(0, 1, cfg)
    return trainer.fit()["losses"], trainer.backbone


def test_channels_last_backbone_trains_like_the_contiguous_one(data, tmp_path):
    plain, _ = _losses(data, tmp_path / "plain", {"channels_last": "off"})
    nhwc, backbone = _losses(data, tmp_path / "nhwc", {"channels_last": "on"})
    conv = next(m for m in backbone.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(torch.tensor(nhwc), torch.tensor(plain), rtol=1e-9, atol=0)


def test_compiled_backbone_trains_like_the_eager_one(data, tmp_path):
    eager, _ = _losses(data, tmp_path / "eager", {}, "test_tinylinear")
    compiled, backbone = _losses(data, tmp_path / "compiled", {"compile": True}, "test_tinylinear")
    assert getattr(backbone, "_compiled_call_impl", None) is not None
    assert not any(k.startswith("_orig_mod") for k in backbone.state_dict())  # checkpoints unchanged
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=1e-9, atol=0)
