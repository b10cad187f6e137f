"""SIGTERM / SIGINT: every rank saves a checkpoint at the same step boundary, then exits.

    stop = StopRequest(group=None, device=torch.device("cpu"))
    stop.install()                  # in the main thread, for the length of the run
    ...                             # at each step boundary:
    if stop.should_stop():          # one all-reduce MAX of one int over the ranks
        trainer.save(); raise Preempted(step, stop.reason)
    # (the trainer folds the flag into its step's one read instead: `agree`, see trainer.py)
    stop.uninstall()

A signal may reach only one rank (`kill` of one worker) or all of them (the launcher
forwards it): the flags are combined at every step boundary, so all ranks see the stop at
the same step and save the same checkpoint. A second SIGINT, at least `REPEAT_WINDOW_S`
after the first (a forwarded copy of the same Ctrl-C does not count), aborts at once.

Exit statuses of a training process (`fr-trainer train`, and through launch/torchrun.sh):
75 preempted (checkpoint saved, rerun resumes), 76 hung (a rank stopped progressing, see
train/watchdog.py), 77 orphaned (the launcher died), 130 aborted by a second SIGINT; 2 is a
bad config or a run directory locked by another job, 3 a non-finite loss.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import torch

from fr_trainer.distributed.collectives import all_reduce_max_int

EXIT_PREEMPTED = 75  # SIGTERM/SIGINT: a checkpoint of the current step was saved; rerun resumes
EXIT_HUNG = 76  # the watchdog: a step waited train.collective_timeout_s for another rank
EXIT_ORPHANED = 77  # the watchdog: the launcher (torchrun agent) died; the worker left
EXIT_ABORTED = 130  # a second SIGINT: aborted without a checkpoint (128 + SIGINT)
STATUS_FILE_VARIABLE = "FR_EXIT_STATUS_FILE"  # launch/torchrun.sh reads the status from it
REPEAT_WINDOW_S = 2.0
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """Stopped by a signal after saving the checkpoint of `step`."""

    def __init__(self, step: int, reason: str, checkpoint: Path | None = None) -> None:
        where = f" ({checkpoint})" if checkpoint else ""
        super().__init__(f"{reason}: checkpoint of step {step} saved{where}; rerun to resume")
        self.step, self.reason, self.checkpoint = step, reason, checkpoint


def write_exit_status(code: int, message: str) -> None:
    """Tell the launcher script why this process exits (no-op when it did not ask)."""
    path = os.environ.get(STATUS_FILE_VARIABLE)
    if not path:
        return
    record = json.dumps({"code": code, "message": message, "pid": os.getpid()})
    try:
        tmp = f"{path}.{os.getpid()}"
        Path(tmp).write_text(record + "\n")
        os.replace(tmp, path)
    except OSError:
        pass  # the status is a courtesy; the exit code and the log still say it


class StopRequest:
    """A stop flag set by SIGTERM/SIGINT, agreed across the ranks at step boundaries."""

    def __init__(self, group=None, device: torch.device | None = None) -> None:
        self.group = group
        self.device = device or torch.device("cpu")
        self.reason = ""
        self.agreed = False  # set by `agree` (the trainer, once per step)
        self._local = threading.Event()
        self._first_sigint: float | None = None
        self._previous: dict[int, object] = {}

    # -------------------------------------------------------------- the handlers
    def install(self) -> bool:
        """Install the handlers (main thread only; returns False elsewhere)."""
        if threading.current_thread() is not threading.main_thread():
            return False
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return True

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        now = time.monotonic()
        if signum == signal.SIGINT:
            if self._first_sigint is not None and now - self._first_sigint >= REPEAT_WINDOW_S:
                write_exit_status(EXIT_ABORTED, "a second SIGINT: aborted without a checkpoint")
                raise KeyboardInterrupt("a second SIGINT: aborting without a checkpoint")
            if self._first_sigint is None:
                self._first_sigint = now
        if not self._local.is_set():
            self.reason = f"{name} received"
            self._local.set()

    def request(self, reason: str) -> None:
        """Ask for a stop from code (tests, the watchdog)."""
        self.reason = self.reason or reason
        self._local.set()

    @property
    def requested_here(self) -> bool:
        return self._local.is_set()

    # -------------------------------------------------------------- the agreement
    def agree(self, any_rank: bool) -> bool:
        """Record the step's agreed flag (some rank's `requested_here`, combined by the
        caller's collective, e.g. the trainer's one read per step); returns it."""
        self.agreed = bool(any_rank)
        if self.agreed and not self.reason:
            self.reason = "another rank received a stop signal"
        return self.agreed

    def should_stop(self) -> bool:
        """Whether any rank got a stop signal (a collective: call it on every rank)."""
        stop = all_reduce_max_int(int(self._local.is_set()), self.group, self.device) > 0
        if stop and not self.reason:
            self.reason = "another rank received a stop signal"
        return stop
