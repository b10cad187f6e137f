"""`train.precision = "auto"` picks the fastest precision at fp32 training accuracy on the
machine it runs on, and says why."""

from __future__ import annotations

import pytest
import torch

from fr_trainer.train import runtime


@pytest.mark.parametrize(("fast_bf16", "expected"), [(True, "bf16"), (False, "fp32")])
def test_auto_on_cpu_is_bf16_exactly_where_the_cpu_runs_it_fast(monkeypatch, fast_bf16, expected):
    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: fast_bf16)
    precision = runtime.resolve_precision("auto", "cpu")
    assert precision.name == expected and precision.param_dtype is torch.float32
    assert not precision.scaler and precision.reason.startswith("auto:")


@pytest.mark.parametrize(("bf16", "expected", "scaler"), [(True, "bf16", False), (False, "fp16", True)])
def test_auto_on_cuda_prefers_bf16_and_scales_only_fp16(monkeypatch, bf16, expected, scaler):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    precision = runtime.resolve_precision("auto", "cuda")
    assert (precision.name, precision.scaler) == (expected, scaler)
    assert "GPU" in precision.reason


def test_an_explicit_precision_is_kept_and_gives_no_reason():
    assert runtime.resolve_precision("fp32", "cpu").reason == ""
    assert runtime.resolve_precision("bf16", "cpu").autocast_dtype is torch.bfloat16
