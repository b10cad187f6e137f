"""What rank 0 tells the user: log lines, a progress bar on a terminal, TensorBoard.

Every method is a no-op on other ranks, so the trainer calls them unconditionally.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

LOGGER_NAME = "fr_trainer.train"


def _format_seconds(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h:d}:{m:02d}:{s:02d}"


class Reporter:
    def __init__(
        self,
        run_dir: Path,
        rank: int,
        total_steps: int,
        progress: str = "auto",
        tensorboard: bool = True,
    ) -> None:
        self.rank, self.total_steps = rank, total_steps
        self.active = rank == 0
        self.logger = logging.getLogger(LOGGER_NAME)
        self._writer = None
        self._bar = None
        if not self.active:
            return
        self.logger.setLevel(logging.INFO)
        self.logger.propagate = False
        for handler in list(self.logger.handlers):
            self.logger.removeHandler(handler)
        formatter = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
        file_handler = logging.FileHandler(run_dir / "train.log")
        file_handler.setFormatter(formatter)
        self.logger.addHandler(file_handler)
        stream = logging.StreamHandler(sys.stdout)
        stream.setFormatter(formatter)
        self.logger.addHandler(stream)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError as error:
                self.logger.info(f"TensorBoard off ({error}); pip install tensorboard")
        if progress == "on" or (progress == "auto" and sys.stderr.isatty()):
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, unit="step", dynamic_ncols=True)

    def info(self, message: str) -> None:
        if self.active:
            if (
                self._bar is not None
            ):  # the bar owns the terminal: message above it, and to the file
                self._bar.write(message)
                record = self.logger.makeRecord(
                    LOGGER_NAME, logging.INFO, "", 0, message, None, None
                )
                self.logger.handlers[0].handle(record)
            else:
                self.logger.info(message)

    def start(self, step: int) -> None:
        self._t0, self._step0 = time.perf_counter(), step
        if self._bar is not None:
            self._bar.update(step)

    def step(self, step: int, loss: float, lr: float, samples_per_step: int, log: bool) -> dict:
        """Called after optimizer step `step` (1-based count). Returns the throughput figures."""
        if not self.active:
            return {}
        elapsed = time.perf_counter() - self._t0
        done = step - self._step0
        rate = done * samples_per_step / elapsed if elapsed > 0 else 0.0
        eta = (self.total_steps - step) * elapsed / done if done else 0.0
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.4g}", sps=f"{rate:.0f}")
        if log:
            self.info(
                f"step {step}/{self.total_steps} loss {loss:.4f} lr {lr:.5g} "
                f"samples/s {rate:.1f} eta {_format_seconds(eta)}"
            )
            self.scalars(step, {"train/loss": loss, "train/lr": lr, "train/samples_per_s": rate})
        return {"samples_per_s": rate, "elapsed_s": elapsed}

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self._writer is not None:
            for name, value in values.items():
                self._writer.add_scalar(name, value, step)
            self._writer.flush()

    def close(self) -> None:
        """Flush and close the progress bar, TensorBoard and the log file (again: a no-op)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        for handler in list(self.logger.handlers):
            handler.close()
            self.logger.removeHandler(handler)
