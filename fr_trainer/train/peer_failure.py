"""When one rank stops on an error of its own, the others say why instead of a traceback.

A rank that meets a bad training record (or another error that is its own, not the job's)
raises it with one line. Its peers are then inside a collective with a rank that is gone,
and gloo/NCCL report "connection closed by peer" with a long traceback that names
nothing. So the failing rank first writes its one-line message to
`RUN_DIR/failures/rank_RRRRR.txt` (the run directory is shared, like the checkpoints),
and a peer whose collective fails looks there: if a peer left a message, it raises
`PeerFailed` with it, which the CLI prints as one line (exit 2). No extra collective: the
check costs nothing until something has already gone wrong. `guarded(step, ...)` does
both around a training step.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from fr_trainer.data.bad_records import BadRecordError

T = TypeVar("T")

FOLDER = "failures"


class PeerFailed(RuntimeError):
    """Another rank stopped on its own error; the message is that rank's."""


def _path(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / FOLDER / f"rank_{rank:05d}.txt"


def report(run_dir: Path, rank: int, error: BaseException) -> None:
    """Leave this rank's one-line message for its peers (before the process goes)."""
    path = _path(run_dir, rank)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + f".{os.getpid()}.partial")
        partial.write_text(" ".join(str(error).split()) + "\n")
        os.replace(partial, path)
    except OSError:  # nowhere to write: the peers fall back to their own traceback
        pass


def peer_message(run_dir: Path, rank: int) -> str | None:
    """The message another rank left, if any: "rank R: ..."."""
    folder = Path(run_dir) / FOLDER
    if not folder.is_dir():
        return None
    for path in sorted(folder.glob("rank_*.txt")):
        other = int(path.stem.removeprefix("rank_"))
        if other != rank:
            return f"rank {other} stopped: {path.read_text().strip()}"
    return None


def clear(run_dir: Path, rank: int) -> None:
    """Forget this rank's message of an earlier attempt (at the start of a run)."""
    _path(run_dir, rank).unlink(missing_ok=True)


def guarded(step: Callable[[], T], run_dir: Path, rank: int, world_size: int) -> T:
    """`step()`, with this rank's own data error (`BadRecordError`) left for its peers
    before it is raised, and a failed collective (a RuntimeError of gloo / NCCL: a peer
    is gone) raised as `PeerFailed` with the message a peer left, when one did."""
    try:
        return step()
    except BadRecordError as error:
        report(run_dir, rank, error)
        raise
    except RuntimeError as error:
        message = peer_message(run_dir, rank) if world_size > 1 else None
        if message is None:
            raise
        raise PeerFailed(message) from error
