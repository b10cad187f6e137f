"""The watchdog: a warning while a step waits, at the timeout a message naming the rank that
stopped progressing and exit status 76; exit 77 when the launcher (parent) is gone."""

from __future__ import annotations

import json
import os
import time

import pytest

from fr_trainer.train.config import ConfigError, config_from_dict
from fr_trainer.train.signals import EXIT_HUNG, EXIT_ORPHANED
from fr_trainer.train.watchdog import Watchdog, heartbeat_path


class Recorder:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.codes: list[int] = []

    def dog(self, folder, rank: int = 0, **kwargs) -> Watchdog:
        return Watchdog(rank, 3, folder, timeout_s=10, interval_s=1, log=self.lines.append,
                        exit=self.codes.append, before_exit=lambda: self.lines.append("before exit"), **kwargs)


def _beat(folder, rank: int, step: int, age_s: float, now: float, phase: str = "train step") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    heartbeat_path(folder, rank).write_text(json.dumps(
        {"rank": rank, "step": step, "phase": phase, "since": now - 100, "time": now - age_s,
         "host": "node7", "pid": 4242}))


def test_warns_then_names_the_frozen_and_the_late_rank(tmp_path):
    rec = Recorder()
    dog = rec.dog(tmp_path, watch_parent=False)
    dog.begin(12, "train step")
    since = time.time()
    dog.check(since + 1)
    assert rec.lines == [] and rec.codes == []
    dog.check(since + 6)  # past warn_after_s = half the timeout
    assert len(rec.lines) == 1 and rec.lines[0].startswith("rank 0: step 12 has waited 6 s (since ")
    assert rec.lines[0].endswith(") in train step")
    dog.check(since + 7)
    assert len(rec.lines) == 1  # warned once per phase
    now = since + 11
    _beat(tmp_path, 1, 12, age_s=9, now=now)  # frozen: its heartbeat stopped 9 s ago
    _beat(tmp_path, 2, 11, age_s=0.5, now=now)  # alive but still in an earlier step
    dog.check(now)
    assert rec.codes == [EXIT_HUNG] and rec.lines[-1] == "before exit"  # e.g. the run lock released
    message = rec.lines[-2]
    assert "rank 0: step 12 has waited 11 s" in message and "train.collective_timeout_s=10" in message
    assert "rank(s) 1, 2 stopped progressing" in message
    assert "rank 1: no heartbeat for 9 s (frozen or dead; last at step 12 in train step, pid 4242 on node7)" in message
    assert "rank 2: still at step 11 in train step" in message
    assert json.loads(heartbeat_path(tmp_path, 0).read_text())["step"] == 12  # its own heartbeat


def test_a_new_phase_restarts_the_clock(tmp_path):
    rec = Recorder()
    dog = rec.dog(tmp_path, watch_parent=False)
    dog.begin(3, "train step")
    dog.begin(3, "checkpoint save")
    dog.check(time.time() + 4)
    assert rec.codes == [] and rec.lines == []


def test_the_thread_exits_at_the_timeout(tmp_path):
    rec = Recorder()
    dog = Watchdog(0, 2, tmp_path, timeout_s=0.5, interval_s=0.05, watch_parent=False,
                   log=rec.lines.append, exit=rec.codes.append)
    dog.start()
    dog.begin(1, "train step")
    deadline = time.monotonic() + 30
    while not rec.codes and time.monotonic() < deadline:
        dog._stopped.wait(0.05)
    dog.stop()
    assert rec.codes == [EXIT_HUNG]
    assert "rank(s) 1 stopped progressing: rank 1: no heartbeat" in rec.lines[-1]


def test_exits_when_the_launcher_is_gone(tmp_path):
    rec = Recorder()
    dog = rec.dog(tmp_path, watch_parent=True)
    dog._parent = os.getppid() + 1  # as if this process had been re-parented
    dog.check(time.time())
    assert rec.codes == [EXIT_ORPHANED]
    assert "the launcher (pid" in rec.lines[-2] and "is gone" in rec.lines[-2]


@pytest.mark.parametrize("value", [0, -5])
def test_collective_timeout_must_be_positive(value):
    with pytest.raises(ConfigError, match=f"train.collective_timeout_s must be > 0 seconds .*got {value}"):
        config_from_dict({"train": {"collective_timeout_s": value}})
