"""SIGTERM/SIGINT: every rank saves the checkpoint of the same step and stops (Preempted);
the rerun resumes from it. A second SIGINT aborts at once."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from test_train_support import config_dict, make_data, make_trainer

from fr_trainer.distributed.spawn import run_ranks
from fr_trainer.train import checkpoint as ckpt
from fr_trainer.train import signals
from fr_trainer.train.signals import Preempted, StopRequest

SIGNAL_AT = 5  # the signal arrives during step 5; periodic checkpoints every 3 steps


def _signal_during(trainer, step: int, sig: int, rank: int = 0) -> None:
    """Send `sig` to this process while `trainer` computes `step` (on `rank` only)."""
    original = trainer.train_step

    def train_step():
        if trainer.step + 1 == step and trainer.rank == rank:
            os.kill(os.getpid(), sig)
        return original()

    trainer.train_step = train_step


def test_sigterm_saves_this_step_and_the_rerun_resumes(tmp_path):
    cfg = config_dict(make_data(tmp_path / "data"), tmp_path / "runs", checkpoint={"every_steps": 3})
    trainer = make_trainer(0, 1, cfg)
    _signal_during(trainer, SIGNAL_AT, signal.SIGTERM)
    with pytest.raises(Preempted, match=f"SIGTERM received: checkpoint of step {SIGNAL_AT} saved"):
        trainer.fit()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are put back
    latest = ckpt.latest_checkpoint(trainer.ckpt_root)
    assert latest is not None and latest.name == f"step_{SIGNAL_AT:08d}"  # not the periodic step 3

    rerun = make_trainer(0, 1, cfg)
    assert rerun.step == SIGNAL_AT
    summary = rerun.fit()
    assert summary["steps"] == 8 and summary["steps_this_run"] == 8 - SIGNAL_AT
    assert not (rerun.run_dir / "run.lock").exists()  # released when the run ends
    clean = make_trainer(0, 1, config_dict(tmp_path / "data", tmp_path / "clean"))
    clean.fit()
    reference, resumed = clean.state_snapshot(), rerun.state_snapshot()
    assert all(torch.equal(reference["backbone"][k], v) for k, v in resumed["backbone"].items())
    assert torch.equal(reference["head"], resumed["head"])


def rank_signalled_fit(rank: int, world_size: int, cfg: dict) -> dict:
    trainer = make_trainer(rank, world_size, cfg)
    _signal_during(trainer, SIGNAL_AT, signal.SIGTERM, rank=1)  # only rank 1 is signalled
    try:
        trainer.fit()
    except Preempted as error:
        return {"step": error.step, "reason": error.reason,
                "latest": ckpt.latest_checkpoint(trainer.ckpt_root).name}
    return {"step": None}


def test_a_signal_to_one_rank_stops_all_at_the_same_step(tmp_path):
    cfg = config_dict(make_data(tmp_path / "data"), tmp_path / "runs", checkpoint={"every_steps": 3})
    results = run_ranks(rank_signalled_fit, 2, cfg, timeout_s=240)
    assert [r["step"] for r in results] == [SIGNAL_AT, SIGNAL_AT]
    assert results[1]["reason"] == "SIGTERM received"
    assert results[0]["reason"] == "another rank received a stop signal"
    assert {r["latest"] for r in results} == {f"step_{SIGNAL_AT:08d}"}


def test_second_sigint_aborts_but_a_forwarded_copy_does_not(monkeypatch):
    stop = StopRequest()
    assert stop.install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # within REPEAT_WINDOW_S: the same Ctrl-C, forwarded
        assert stop.requested_here and stop.should_stop() and stop.reason == "SIGINT received"
        monkeypatch.setattr(signals, "REPEAT_WINDOW_S", 0.0)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stop.uninstall()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_no_signal_no_stop():
    stop = StopRequest()
    assert not stop.should_stop() and not stop.requested_here
