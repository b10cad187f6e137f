"""One job per run directory: `run.lock` (host, pid, start time, heartbeat), taken by rank 0.

    lock = RunLock(run_dir)
    lock.acquire()       # RunLocked (a ConfigError: exit status 2) when a live job holds it
    lock.refresh()       # now and then (the watchdog thread does it): the heartbeat
    lock.release()

A lock is stale, and is taken over with a warning, when its process is gone (on this host
the pid is not alive; on another host its heartbeat is older than `stale_after_s`) or when
it belongs to the same torchrun job (`TORCHELASTIC_RUN_ID`: an elastic restart, whose rank 0
may be on another host). The same process may take its own lock again (a second Trainer on
one run directory, one after the other, in one Python process).
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import sys
import time
import uuid
from pathlib import Path

from fr_trainer.train.config import ConfigError

LOCK_NAME = "run.lock"
STALE_AFTER_S = 300.0  # another host's lock whose heartbeat is older than this is stale


class RunLocked(ConfigError):
    """Another live job holds the run directory."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def describe(holder: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("started", 0))))
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {started}"


def read_lock(path: Path) -> dict | None:
    """The holder written in `path`, None when there is none; an unreadable lock counts as
    held by an unknown process on an unknown host (stale once its mtime is old)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        holder = json.loads(text)
        if not isinstance(holder, dict):
            raise ValueError(holder)
        return holder
    except ValueError:
        mtime = path.stat().st_mtime if path.exists() else 0.0
        return {"host": "?", "pid": -1, "started": mtime, "heartbeat": mtime}


class RunLock:
    def __init__(self, run_dir: Path, stale_after_s: float = STALE_AFTER_S, warn=None) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self.stale_after_s = stale_after_s
        self.warn = warn or (lambda message: print(message, file=sys.stderr, flush=True))
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.token = uuid.uuid4().hex
        self.job = os.environ.get("TORCHELASTIC_RUN_ID", "")  # the same across elastic restarts
        self.held = False

    def _record(self) -> dict:
        now = time.time()
        return {"host": self.host, "pid": self.pid, "started": now, "heartbeat": now, "token": self.token,
                "job": self.job}

    def stale_reason(self, holder: dict) -> str | None:
        """Why `holder` no longer holds the run (None: it is alive)."""
        if self.job and holder.get("job") == self.job:
            return f"an earlier attempt of this job ({self.job}; an elastic restart)"
        if holder.get("host") == self.host:
            pid = int(holder.get("pid", -1))
            if pid == self.pid:
                return "held by this process (an earlier run in it)"
            if not _pid_alive(pid):
                return f"pid {pid} is not running on {self.host}"
            return None
        age = time.time() - float(holder.get("heartbeat", 0))
        if age > self.stale_after_s:
            return f"its heartbeat is {age:.0f} s old (stale after {self.stale_after_s:.0f} s)"
        return None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a take-over race with another job: look again
            if self._create():
                self._confirm()
                return
            holder = read_lock(self.path)
            if holder is None:
                continue
            reason = self.stale_reason(holder)
            if reason is None:
                raise RunLocked(
                    f"run directory {self.path.parent} is in use by another job ({describe(holder)}; "
                    f"lock {self.path}); wait for it, stop it, or pick another run.name"
                )
            if holder.get("pid") != self.pid or holder.get("host") != self.host:
                self.warn(f"taking over the stale lock {self.path} of {describe(holder)}: {reason}")
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
        raise RunLocked(f"could not take the lock {self.path} (another job keeps taking it); retry")

    def _create(self) -> bool:
        tmp = self.path.with_name(f".{LOCK_NAME}.{self.token}")
        tmp.write_text(json.dumps(self._record()) + "\n")
        try:
            os.link(tmp, self.path)  # atomic: fails when the lock exists, also on NFS
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def _confirm(self) -> None:
        holder = read_lock(self.path) or {}
        if holder.get("token") != self.token:
            raise RunLocked(f"lost the race for {self.path} to {describe(holder)}; retry")
        self.held = True
        atexit.register(self.release)

    def refresh(self) -> None:
        """Renew the heartbeat (other hosts judge staleness by it)."""
        if not self.held:
            return
        holder = read_lock(self.path) or {}
        if holder.get("token") != self.token:
            return  # taken over: leave the new holder alone
        holder["heartbeat"] = time.time()
        tmp = self.path.with_name(f".{LOCK_NAME}.{self.token}")
        tmp.write_text(json.dumps(holder) + "\n")
        os.replace(tmp, self.path)

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        holder = read_lock(self.path) or {}
        if holder.get("token") == self.token:
            self.path.unlink(missing_ok=True)


def take_run_lock(run_dir: Path, rank: int, group, device) -> RunLock | None:
    """Rank 0 takes the lock; every rank raises `RunLocked` when it could not (a collective)."""
    from fr_trainer.distributed.collectives import all_reduce_max_int

    lock, error = None, None
    if rank == 0:
        lock = RunLock(run_dir)
        try:
            lock.acquire()
        except RunLocked as caught:
            error = caught
    if all_reduce_max_int(int(error is not None), group, device):
        raise error or RunLocked(f"rank 0 could not take the lock of run directory {run_dir} (see its message)")
    return lock
