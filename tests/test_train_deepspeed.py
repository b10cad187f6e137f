"""DeepSpeed ZeRO stage 1/2 as the backbone engine (`engine.name = "deepspeed"`): on 2 gloo
ranks on CPU it must train exactly like the DDP engine (same losses, backbone and head),
since both average the backbone gradient over ranks and the trainer's world-size factor
turns that into the sum; and it must resume from its own checkpoint."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("deepspeed", reason="the `deepspeed` extra is not installed")

from test_train_support import config_dict, rank_fit  # noqa: E402

from fr_trainer.distributed.spawn import run_ranks  # noqa: E402
from fr_trainer.train.config import ConfigError, config_from_dict  # noqa: E402


def rank_runs(rank: int, world_size: int, runs: list[tuple[dict, int | None]]) -> list[dict]:
    """`rank_fit` for each (config, stop_after) in turn, in one pair of processes: each
    spawn pays for importing torch and DeepSpeed, which is most of this test's time."""
    return [rank_fit(rank, world_size, cfg, stop_after) for cfg, stop_after in runs]

# 4 optimizer steps of 2 micro-batches, lr warming up over 2 steps then decaying: the
# schedule must reach the backbone's optimizer inside the engine, and the engine must
# reduce only at the accumulation boundary.
# With an EMA of the backbone (model.ema_decay): it must follow the engine's steps and resume.
SECTIONS = {"train": {"max_steps": 4}, "optim": {"accumulate": 2, "warmup_steps": 2}, "model": {"ema_decay": 0.5}}


def _config(data, out, engine: dict | None = None, **extra) -> dict:
    sections = {**SECTIONS, **extra}
    if engine:
        sections["engine"] = engine
    return config_dict(data, out, **sections)


def _assert_same_run(got: list[dict], want: list[dict], what: str) -> None:
    for rank, (g, w) in enumerate(zip(got, want)):
        # fp32; for 2 ranks the mean of two gradients is exact in both engines, and the
        # engines add the same numbers: equal to rounding of the flat vs per-tensor update
        torch.testing.assert_close(
            torch.tensor(g["losses"]), torch.tensor(w["losses"]), rtol=1e-6, atol=1e-7,
            msg=f"{what} rank {rank}: losses differ",
        )
        for name, tensor in w["snapshot"]["backbone"].items():
            torch.testing.assert_close(
                g["snapshot"]["backbone"][name], tensor, rtol=1e-6, atol=1e-7,
                msg=f"{what} rank {rank}: backbone {name} differs",
            )
        torch.testing.assert_close(g["snapshot"]["head"], w["snapshot"]["head"], rtol=1e-6, atol=1e-7)
        assert set(g["snapshot"]["ema"]) == set(w["snapshot"]["ema"]) == set(w["snapshot"]["backbone"])
        for name, tensor in w["snapshot"]["ema"].items():
            torch.testing.assert_close(g["snapshot"]["ema"][name], tensor, rtol=1e-6, atol=1e-7,
                                       msg=f"{what} rank {rank}: EMA {name} differs")
        torch.testing.assert_close(g["head"]["momentum"], w["head"]["momentum"], rtol=1e-6, atol=1e-7)


def test_zero_stage_1_and_2_train_like_ddp_and_resume(data, tmp_path):
    zero1, zero2 = ({"name": "deepspeed", "zero_stage": s} for s in (1, 2))
    resumable = _config(data, tmp_path / "resumed", zero2)
    runs = [
        (_config(data, tmp_path / "ddp"), None),
        (_config(data, tmp_path / "zero1", zero1), None),
        (_config(data, tmp_path / "zero2", zero2), None),
        # stopped after step 2 (checkpointed: weights, head, ZeRO partitions), then a new
        # trainer resumes from the checkpoint on disk
        (resumable, 2),
        (resumable, None),
    ]
    per_rank = run_ranks(rank_runs, 2, runs)
    ddp, zero_1, zero_2, stopped, resumed = (list(r) for r in zip(*per_rank))
    assert ddp[0]["losses"][-1] < ddp[0]["losses"][0]
    assert ddp[0]["losses"] == ddp[1]["losses"]
    for stage, zero in ((1, zero_1), (2, zero_2)):
        _assert_same_run(zero, ddp, f"ZeRO stage {stage}")
        # the backbone is replicated again after every ZeRO step
        for name, tensor in zero[0]["snapshot"]["backbone"].items():
            assert torch.equal(tensor, zero[1]["snapshot"]["backbone"][name]), name
    assert [r["step"] for r in stopped] == [2, 2]
    assert [r["step"] for r in resumed] == [4, 4]
    for r, s in zip(resumed, stopped):
        r["losses"] = s["losses"] + r["losses"]
    # without the saved momentum partition the backbone would differ from the straight run
    _assert_same_run(resumed, ddp, "ZeRO stage 2 resumed")


def test_config_rejects_what_the_engine_cannot_do(tmp_path):
    base = config_dict(tmp_path, tmp_path / "out")
    assert config_from_dict(base).engine.name == "ddp"
    ok = config_from_dict({**base, "engine": {"name": "deepspeed", "zero_stage": 2}})
    assert ok.engine.zero_stage == 2
    bad = [
        ({"engine": {"name": "deepspeed", "zero_stage": 3}}, "zero_stage"),
        ({"engine": {"name": "fsdp"}}, "engine.name"),
        ({"engine": {"name": "deepspeed"}, "optim": {"clip_grad_norm": 1.0}}, "clip_grad_norm"),
        ({"engine": {"name": "deepspeed"}, "train": {"nonfinite": "skip"}}, "nonfinite"),
    ]
    for change, word in bad:
        values = {k: {**base.get(k, {}), **v} for k, v in change.items()}
        with pytest.raises(ConfigError, match=word):
            config_from_dict({**base, **values})
