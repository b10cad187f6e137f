"""`train.host_reads = "when_logging"` (fr_trainer/train/step_reads.py), forced on the CPU
(it is the default on CUDA): a step makes one host read instead of two; a run by epochs on
two gloo ranks gives the losses and weights of the every-step run, reading them once per
logging interval; a non-finite loss stops the run at the next read, naming its step, with
nothing saved after it; a stop signal is acted on at the next read, on every rank."""

from __future__ import annotations

import math
import signal

import pytest
import torch
from test_train_signals import _signal_during
from test_train_step_reads import _prefetched
from test_train_support import config_dict, make_data, make_trainer

from fr_trainer.distributed.spawn import run_ranks
from fr_trainer.heads.step_count import counting
from fr_trainer.train import checkpoint as ckpt
from fr_trainer.train.config import ConfigError, config_from_dict
from fr_trainer.train.signals import Preempted
from fr_trainer.train.step_reads import resolve_host_reads
from fr_trainer.train.trainer import NonFiniteLoss

DEFERRED = {"host_reads": "when_logging"}


def test_a_deferred_step_reads_the_host_once_and_leaves_its_row_on_the_device(tmp_path) -> None:
    cfg = config_dict(make_data(tmp_path / "data"), tmp_path / "runs", train=DEFERRED)
    trainer = make_trainer(0, 1, cfg)
    trainer.stream.next = _prefetched(trainer.stream.next)
    trainer.train_step()
    trainer.step += 1  # (what `fit` does after each step)
    with counting() as counter:
        result = trainer.train_step()
    assert {k: v for k, v in counter.syncs.items() if v} == {"tolist": 1}  # the head's input report only
    assert result.loss is None and trainer.reads.pending == 2
    assert [r.step for r in trainer._apply_reads()] == [1, 2] and trainer.reads.reads == 1


def _fit(rank: int, world_size: int, cfg: dict) -> dict:
    trainer = make_trainer(rank, world_size, cfg)
    summary = trainer.fit()
    return {"losses": summary["losses"], "reads": trainer.reads.reads, "snapshot": trainer.state_snapshot()}


def test_reads_when_logging_give_the_every_step_run_once_per_logging_interval(tmp_path) -> None:
    data = make_data(tmp_path / "data")
    sections = {"train": {"max_steps": None, "epochs": 2}, "log": {"every_steps": 4}}  # 12 steps
    deferred = run_ranks(_fit, 2, config_dict(data, tmp_path / "d", train={**sections["train"], **DEFERRED},
                                              log=sections["log"]))
    every = run_ranks(_fit, 2, config_dict(data, tmp_path / "e", **sections))
    for a, b in zip(deferred, every):
        assert len(a["losses"]) == 12 and a["losses"] == b["losses"]
        assert (a["reads"], b["reads"]) == (3, 12)  # steps 4, 8 and 12; every step
        assert torch.equal(a["snapshot"]["head"], b["snapshot"]["head"])
        assert all(torch.equal(v, b["snapshot"]["backbone"][k]) for k, v in a["snapshot"]["backbone"].items())


def test_a_nonfinite_loss_read_late_stops_the_run_naming_its_step_and_nothing_after_it_is_saved(
        tmp_path, monkeypatch) -> None:
    cfg = config_dict(make_data(tmp_path / "data"), tmp_path / "runs", train=DEFERRED,
                      log={"every_steps": 4}, checkpoint={"every_steps": 2})
    trainer = make_trainer(0, 1, cfg)
    real_loss = trainer._regularized_loss

    def nan_at_step_3(*args):
        loss = real_loss(*args)
        return loss * float("nan") if trainer.step + 1 == 3 else loss

    monkeypatch.setattr(trainer, "_regularized_loss", nan_at_step_3)
    named = r"step 3: loss is nan; stopping .*read after step 4.*no checkpoint after step 2"
    with pytest.raises(NonFiniteLoss, match=named):
        trainer.fit()
    assert [p.name for p in ckpt.complete_checkpoints(trainer.ckpt_root)] == ["step_00000002"]
    assert len(trainer.losses) == 2 and all(math.isfinite(loss) for loss in trainer.losses)  # steps 1 and 2


def test_a_stop_signal_is_acted_on_at_the_next_read(tmp_path) -> None:
    cfg = config_dict(make_data(tmp_path / "data"), tmp_path / "runs", train=DEFERRED, log={"every_steps": 3})
    trainer = make_trainer(0, 1, cfg)
    _signal_during(trainer, 2, signal.SIGTERM)
    with pytest.raises(Preempted, match="checkpoint of step 3 saved"):
        trainer.fit()
    assert ckpt.latest_checkpoint(trainer.ckpt_root).name == "step_00000003"


def test_auto_defers_on_cuda_with_the_stop_policy_only_and_skip_refuses_deferral(tmp_path) -> None:
    assert resolve_host_reads("auto", "cuda", "stop") == "when_logging"
    assert resolve_host_reads("auto", "cuda", "skip") == resolve_host_reads("auto", "cpu", "stop") == "every_step"
    cfg = config_dict(tmp_path, tmp_path / "runs", train={**DEFERRED, "nonfinite": "skip"})
    with pytest.raises(ConfigError, match='use train.host_reads = "every_step"'):
        config_from_dict(cfg)
