"""One job per run directory: a live holder refuses a second job (exit 2, naming it); a
stale lock (dead pid here, old heartbeat elsewhere, an earlier attempt of the same job) is
taken over with a warning; the lock goes when the run ends."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fr_trainer.train.run_lock import LOCK_NAME, RunLock, RunLocked

ROOT = Path(__file__).resolve().parents[1]
HOLD = """
import sys
from fr_trainer.train.run_lock import RunLock
lock = RunLock(sys.argv[1]); lock.acquire(); print("held", flush=True); sys.stdin.read()
"""


@pytest.fixture
def holder(tmp_path):
    """A live process holding the lock of tmp_path/run."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TORCHELASTIC_RUN_ID", None)
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "run")], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "held"
    yield proc
    proc.stdin.close()
    proc.wait(timeout=60)


def _write(path: Path, **holder) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(holder))


def test_a_live_holder_refuses_a_second_job(tmp_path, holder):
    with pytest.raises(RunLocked, match=rf"is in use by another job \(pid {holder.pid} on {socket.gethostname()}"):
        RunLock(tmp_path / "run").acquire()


def test_the_cli_is_refused_with_status_2(tmp_path, holder):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        env.pop(key, None)
    out = subprocess.run([sys.executable, "-m", "fr_trainer", "train", str(ROOT / "configs" / "demo.toml"),
                          "--set", f"run.output_dir={tmp_path}", "--set", "run.name=run",
                          "--set", f"data.root={tmp_path / 'no-data'}", "--set", "train.device=cpu"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 2, out.stderr
    assert f"is in use by another job (pid {holder.pid} on" in out.stderr
    assert json.loads((tmp_path / "run" / LOCK_NAME).read_text())["pid"] == holder.pid  # left alone


def test_a_dead_pid_on_this_host_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    pid = int(dead.stdout)
    path = tmp_path / "run" / LOCK_NAME
    _write(path, host=socket.gethostname(), pid=pid, started=time.time(), heartbeat=time.time())
    warnings: list[str] = []
    lock = RunLock(tmp_path / "run", warn=warnings.append)
    lock.acquire()
    assert json.loads(path.read_text())["pid"] == os.getpid()
    assert len(warnings) == 1 and f"pid {pid} is not running on" in warnings[0]
    lock.release()
    assert not path.exists()


def test_another_host_is_judged_by_its_heartbeat(tmp_path):
    path = tmp_path / "run" / LOCK_NAME
    _write(path, host="elsewhere", pid=1, started=time.time() - 60, heartbeat=time.time() - 10)
    with pytest.raises(RunLocked, match="pid 1 on elsewhere"):
        RunLock(tmp_path / "run", stale_after_s=300).acquire()
    _write(path, host="elsewhere", pid=1, started=time.time() - 900, heartbeat=time.time() - 400)
    warnings: list[str] = []
    lock = RunLock(tmp_path / "run", stale_after_s=300, warn=warnings.append)
    lock.acquire()
    assert "heartbeat is 400 s old" in warnings[0]
    before = json.loads(path.read_text())["heartbeat"]
    lock.refresh()
    assert json.loads(path.read_text())["heartbeat"] >= before
    lock.release()


def test_an_earlier_attempt_of_the_same_elastic_job_is_taken_over(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-17")
    path = tmp_path / "run" / LOCK_NAME
    _write(path, host="other-node", pid=1, started=time.time(), heartbeat=time.time(), job="job-17")
    warnings: list[str] = []
    RunLock(tmp_path / "run", warn=warnings.append).acquire()
    assert "an earlier attempt of this job (job-17" in warnings[0]
