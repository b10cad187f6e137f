"""The DeepSpeed engine never scales its loss, so its precision must not need a GradScaler:
`train.precision = "auto"` is bf16 on a CUDA device that has it (else fp32), explicit fp16
is a clear error, and the trainer builds no scaler with that engine. CUDA is stood in for
by asking the resolver for device_type "cuda" (and mocking bf16 support)."""

from __future__ import annotations

import pytest
import torch
from test_train_support import config_dict, make_trainer

from fr_trainer.train import runtime
from fr_trainer.train.config import ConfigError


@pytest.mark.parametrize("bf16", [True, False])
def test_deepspeed_auto_precision_on_cuda_needs_no_scaler(monkeypatch, bf16):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    precision = runtime.resolve_precision("auto", "cuda", "deepspeed")
    assert precision.name == ("bf16" if bf16 else "fp32")
    assert not precision.scaler
    assert precision.param_dtype == torch.float32


def test_deepspeed_precision_choices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert runtime.resolve_precision("auto", "cpu", "deepspeed").name == "fp32"
    assert runtime.resolve_precision("bf16", "cuda", "deepspeed").autocast_dtype == torch.bfloat16
    assert runtime.resolve_precision("fp32", "cuda", "deepspeed").autocast_dtype is None
    with pytest.raises(ConfigError, match="precision='fp16' is not supported with engine.name='deepspeed'"):
        runtime.resolve_precision("fp16", "cuda", "deepspeed")
    # the DDP engine keeps fp16 with a scaler on CUDA when asked for
    ddp = runtime.resolve_precision("fp16", "cuda", "ddp")
    assert (ddp.name, ddp.scaler) == ("fp16", True)


def test_trainer_with_deepspeed_builds_no_grad_scaler(monkeypatch, tmp_path):
    """A trainer whose precision is resolved as on CUDA, with the engine stood in for by a
    plain optimizer (the engine itself is tested in test_train_deepspeed.py)."""
    from fr_trainer.train import deepspeed_engine, trainer

    real = trainer.resolve_precision
    monkeypatch.setattr(trainer, "resolve_precision", lambda name, _device, *rest: real(name, "cuda", *rest))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)

    def fake_engine(backbone, head, make_optimizer, config, env):
        params = list(backbone.parameters()) + list(head.parameters())
        return backbone, make_optimizer([{"params": params}])

    monkeypatch.setattr(deepspeed_engine, "build_engine", fake_engine)
    from test_train_support import make_data

    data = make_data(tmp_path / "data")
    cfg = config_dict(data, tmp_path / "out", train={"precision": "auto", "max_steps": 1},
                      engine={"name": "deepspeed"})
    built = make_trainer(0, 1, cfg)
    assert built.precision.name == "bf16"
    assert built.scaler is None
    cfg["engine"] = {"name": "ddp"}  # fp16 under DDP builds a scaler
    cfg["train"]["precision"] = "fp16"
    assert make_trainer(0, 1, cfg).scaler is not None
