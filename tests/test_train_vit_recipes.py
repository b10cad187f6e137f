"""The ViT recipes: configs/wf42m_pfc03_vit_{t,s,b,l}.toml carry arcface_torch's settings
(configs/wf42m_pfc03_40epoch_*_vit_*.py over base.py), the accumulation clip is the
upstream one, and a ViT trains under DDP on 2 gloo ranks without unused-parameter
detection, with masking, drop-path and checkpointing on."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_train_support import config_dict, make_data, rank_fit

from fr_trainer.backbones.registry import BACKBONES
from fr_trainer.backbones.vit import vit_demo
from fr_trainer.distributed.spawn import run_ranks
from fr_trainer.train.config import load_config

if "test_vit_masked" not in BACKBONES:  # one-block vit_demo, without / with token masking and drop-path
    BACKBONES.register("test_vit_plain")(lambda embedding_size=16: vit_demo(embedding_size, depth=1))
    BACKBONES.register("test_vit_masked")(
        lambda embedding_size=16: vit_demo(embedding_size, depth=2, drop_path_rate=0.2, mask_ratio=0.1))

ROOT = Path(__file__).resolve().parents[1]

# name: (per-GPU batch, gradient_acc, GPUs of the upstream config, grad checkpointing)
UPSTREAM = {"t": (512, 1, 8, False), "s": (384, 1, 64, False), "b": (256, 12, 8, True), "l": (384, 1, 64, True)}


@pytest.mark.parametrize("name", sorted(UPSTREAM))
def test_vit_configs_carry_arcface_torchs_settings(name):
    c = load_config(ROOT / "configs" / f"wf42m_pfc03_vit_{name}.toml")
    batch, acc, gpus, ckpt = UPSTREAM[name]
    assert (c.model.backbone, c.model.embedding_size, c.model.grad_checkpointing) == (f"vit_{name}", 512, ckpt)
    assert (c.data.batch_size, c.optim.accumulate, c.data.num_classes) == (batch, acc, 2059906)
    assert batch * acc * gpus in (4096, 24576)
    assert (c.optim.name, c.optim.lr, c.optim.weight_decay, c.optim.betas, c.optim.eps) == (
        "adamw", 0.001, 0.1, [0.9, 0.999], 1e-8)
    assert (c.optim.warmup_epochs, c.train.epochs, c.optim.power) == (4.0, 40.0, 1.0)  # warmup = 40 // 10
    assert c.optim.clip_grad_norm == pytest.approx(5.0 / acc, rel=1e-5) and c.optim.clip_scope == "backbone"
    assert (c.head.margin, c.head.margin_args, c.head.sample_rate, c.head.update) == (
        "cosface", {"s": 64.0, "m": 0.4}, 0.3, "dense")
    assert (c.train.precision, c.train.scaler_growth_interval, c.run.seed) == ("fp16", 100, 2048)
    assert (c.ddp.bucket_cap_mb, c.ddp.comm_hook, c.ddp.static_graph, c.ddp.broadcast_buffers) == (
        16, "fp16", True, False)


def test_vit_demo_config_loads():
    c = load_config(ROOT / "configs" / "vit_demo.toml")
    assert (c.model.backbone, c.optim.name, c.eval.at_start, c.eval.at_end) == ("vit_demo", "adamw", True, True)


def test_mean_gradient_clipped_at_5_over_acc_is_upstreams_summed_gradient_clipped_at_5():
    """Upstream sums `acc` micro-batch gradients and clips the sum at 5; we average and clip
    at 5 / acc. The clipped gradients differ by exactly the factor acc, which AdamW does not
    see (its update is invariant to the gradient's scale, up to eps)."""
    torch.manual_seed(0)
    acc = 12
    grads = [torch.randn(50) * 3 for _ in range(acc)]
    start = torch.randn(50)

    def adamw_step(grad: torch.Tensor, clip: float) -> torch.Tensor:
        p = torch.nn.Parameter(start.clone())
        opt = torch.optim.AdamW([p], lr=1e-3, weight_decay=0.1)
        for _ in range(3):
            p.grad = grad.clone()
            torch.nn.utils.clip_grad_norm_([p], clip)
            opt.step()
        return p.detach()

    summed = adamw_step(torch.stack(grads).sum(0), 5.0)
    mean = adamw_step(torch.stack(grads).mean(0), 5.0 / acc)
    assert torch.stack(grads).sum(0).norm() > 5.0  # the clip is active
    torch.testing.assert_close(mean, summed, rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("vit_data"))


def rank_fit_vit(rank: int, world_size: int, cfg: dict) -> dict:
    return rank_fit(rank, world_size, cfg)  # from this module, so the test backbone is registered


@pytest.mark.parametrize("backbone", ["test_vit_plain", "test_vit_masked"])
def test_vit_trains_under_ddp_with_checkpointing_and_accumulation(data, tmp_path, backbone):
    cfg = config_dict(
        data, tmp_path,
        model={"backbone": backbone, "embedding_size": 16, "grad_checkpointing": True},
        optim={"name": "adamw", "lr": 1e-3, "weight_decay": 0.1, "accumulate": 2, "clip_grad_norm": 2.5,
               "clip_scope": "backbone", "warmup_steps": 1},
        data={"batch_size": 4},
        train={"max_steps": 2},
        head={"sample_rate": 0.5},
    )
    # test_vit_plain: no masking, its mask token frozen; test_vit_masked: masking and drop-path on
    results = run_ranks(rank_fit_vit, 2, cfg)
    assert len(results[0]["losses"]) == 2
    assert all(torch.isfinite(torch.tensor(r["losses"])).all() for r in results)
    assert results[0]["losses"] == results[1]["losses"]  # the loss is global
