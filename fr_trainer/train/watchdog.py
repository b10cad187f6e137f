"""One thread per rank that turns a silent hang into a message naming the rank waited for.

    dog = Watchdog(rank, world_size, run_dir / "heartbeats", timeout_s=600)
    dog.start()
    dog.begin(step, "train step")   # the main thread, whenever a step or phase begins
    dog.stop()

Every `interval_s` the thread writes this rank's heartbeat (step, phase, when it began, the
time now) to `heartbeats/rank_RRRRR.json` and checks how long the current phase has run:

- after `warn_after_s` it logs `rank R: step S has waited T s (since HH:MM:SS) in PHASE`;
- after `timeout_s` it reads the other ranks' heartbeats, names those that stopped
  progressing (no heartbeat for a while: frozen or dead; or still at an earlier step) and
  exits the process with `EXIT_HUNG` (76);
- under torchrun, when the launcher (the parent process) is gone, it exits with
  `EXIT_ORPHANED` (77) within `PARENT_CHECK_S` instead of training on as an orphan.

A frozen process (SIGSTOP, a stuck driver) stops its own heartbeat too, which is how the
others tell it apart from a rank that is merely slow.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from fr_trainer.train.signals import EXIT_HUNG, EXIT_ORPHANED, write_exit_status

# the process group's timeout is train.collective_timeout_s + this: the watchdog, which can
# say which rank is missing, speaks first; the c10d timeout stays the backstop
COLLECTIVE_SLACK_S = 30.0
WARN_FRACTION = 0.5  # warn when a phase has taken this fraction of the timeout
PARENT_CHECK_S = 1.0  # the launcher's death is noticed within this (a getppid() per tick)


def _clock(wall: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(wall))


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def heartbeat_path(folder: Path, rank: int) -> Path:
    return folder / f"rank_{rank:05d}.json"


def read_heartbeats(folder: Path, world_size: int) -> dict[int, dict | None]:
    """rank -> its last heartbeat (None when it has none or it cannot be read)."""
    out: dict[int, dict | None] = {}
    for rank in range(world_size):
        try:
            out[rank] = json.loads(heartbeat_path(folder, rank).read_text())
        except (OSError, ValueError):
            out[rank] = None
    return out


def stalled_ranks(
    beats: dict[int, dict | None], me: int, my_step: int, now: float, stale_after_s: float
) -> dict[int, str]:
    """The ranks that stopped progressing, each with why: no heartbeat for `stale_after_s`
    (frozen or dead), or still at a step before `my_step`."""
    out = {}
    for rank, beat in beats.items():
        if rank == me:
            continue
        if beat is None:
            out[rank] = "no heartbeat (not started, or cannot write the run directory)"
        elif now - float(beat["time"]) > stale_after_s:
            out[rank] = (
                f"no heartbeat for {now - float(beat['time']):.0f} s (frozen or dead; last at step "
                f"{beat['step']} in {beat['phase']}, pid {beat.get('pid')} on {beat.get('host')})"
            )
        elif int(beat["step"]) < my_step:
            out[rank] = f"still at step {beat['step']} in {beat['phase']} since {_clock(beat['since'])}"
    return out


class Watchdog:
    """See the module docstring. `on_tick` runs on each heartbeat (rank 0 refreshes the run
    lock), `before_exit` before the watchdog ends the process; `exit` and `log` are injectable
    for tests."""

    def __init__(
        self,
        rank: int,
        world_size: int,
        folder: Path,
        timeout_s: float,
        warn_after_s: float | None = None,
        interval_s: float | None = None,
        watch_parent: bool | None = None,
        on_tick: Callable[[], None] | None = None,
        before_exit: Callable[[], None] | None = None,
        log: Callable[[str], None] = _stderr,
        exit: Callable[[int], None] = os._exit,
    ) -> None:
        self.rank, self.world_size, self.folder = rank, world_size, Path(folder)
        self.timeout_s = float(timeout_s)
        self.warn_after_s = WARN_FRACTION * self.timeout_s if warn_after_s is None else warn_after_s
        self.interval_s = interval_s or min(10.0, max(0.2, self.timeout_s / 8))
        # no heartbeat for this long: frozen or dead (below the timeout, so a rank frozen when
        # this phase began is named when the timeout comes)
        self.stale_after_s = min(3 * self.interval_s + 2.0, self.timeout_s / 2)
        self.watch_parent = "TORCHELASTIC_RUN_ID" in os.environ if watch_parent is None else watch_parent
        self.on_tick, self.before_exit, self.log, self._exit = on_tick, before_exit, log, exit
        self.host, self.pid = socket.gethostname(), os.getpid()
        self._lock = threading.Lock()
        self._step, self._phase, self._since = 0, "start-up", time.time()
        self._warned = False
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._parent = os.getppid()

    # -------------------------------------------------------------- main thread
    def begin(self, step: int, phase: str) -> None:
        """Step `step` (the one being computed) enters `phase` now; restarts the clock."""
        with self._lock:
            self._step, self._phase, self._since, self._warned = step, phase, time.time(), False

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._parent = os.getppid()
        self._beat(time.time())
        self._thread = threading.Thread(target=self._run, name=f"fr-watchdog-{self.rank}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    # -------------------------------------------------------------- the thread
    def _beat(self, now: float) -> None:
        with self._lock:
            record = {"rank": self.rank, "step": self._step, "phase": self._phase, "since": self._since,
                      "time": now, "host": self.host, "pid": self.pid}
        path = heartbeat_path(self.folder, self.rank)
        tmp = path.with_name(f".{path.name}.{self.pid}")
        try:
            tmp.write_text(json.dumps(record))
            os.replace(tmp, path)
        except OSError:
            pass  # a full or vanished run directory must not kill training by itself

    def _run(self) -> None:
        last = time.monotonic()
        while not self._stopped.wait(min(PARENT_CHECK_S, self.interval_s)):
            if self._orphaned():
                return
            if time.monotonic() - last >= self.interval_s:
                last = time.monotonic()
                self.check(time.time())

    def _orphaned(self) -> bool:
        if self.watch_parent and os.getppid() != self._parent:
            self._die(EXIT_ORPHANED, f"rank {self.rank}: the launcher (pid {self._parent}, the torchrun agent) "
                                     f"is gone; exiting instead of training on as an orphan "
                                     f"(status {EXIT_ORPHANED})")
            return True
        return False

    def check(self, now: float) -> None:
        """One heartbeat round of the thread's work (public for tests)."""
        if self._orphaned():
            return
        self._beat(now)
        if self.on_tick is not None:
            try:
                self.on_tick()
            except Exception as error:  # noqa: BLE001 - a refresh failing must not stop the watch
                self.log(f"rank {self.rank}: watchdog tick failed: {error}")
        with self._lock:
            step, phase, since, warned = self._step, self._phase, self._since, self._warned
        waited = now - since
        if waited >= self.timeout_s:
            self._die(EXIT_HUNG, self._hang_message(step, phase, since, waited, now))
        elif waited >= self.warn_after_s and not warned:
            with self._lock:
                self._warned = True
            self.log(f"rank {self.rank}: step {step} has waited {waited:.0f} s (since {_clock(since)}) in {phase}")

    def _hang_message(self, step: int, phase: str, since: float, waited: float, now: float) -> str:
        stalled = stalled_ranks(read_heartbeats(self.folder, self.world_size), self.rank, step, now,
                                self.stale_after_s)
        if stalled:
            names = ", ".join(str(r) for r in stalled)
            who = f"rank(s) {names} stopped progressing: " + "; ".join(f"rank {r}: {w}" for r, w in stalled.items())
        else:
            who = "no other rank looks stalled (all are at this step or later): a collective mismatch?"
        return (f"rank {self.rank}: step {step} has waited {waited:.0f} s (since {_clock(since)}) in {phase}, "
                f"past train.collective_timeout_s={self.timeout_s:g}; {who}; exiting with status {EXIT_HUNG}")

    def _die(self, code: int, message: str) -> None:
        self.log(message)
        write_exit_status(code, message)
        self._stopped.set()
        if self.before_exit is not None:  # os._exit skips atexit: e.g. release the run lock here
            try:
                self.before_exit()
            except Exception as error:  # noqa: BLE001 - exiting matters more
                self.log(f"rank {self.rank}: {error}")
        self._exit(code)
