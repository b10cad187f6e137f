"""What reading a file that is not a checkpoint raises, and the one-line message for it.

`torch.load` of a junk, empty or truncated file raises `pickle.UnpicklingError`,
`EOFError` or a `RuntimeError` from its zip reader; the CLIs catch `UNREADABLE` around
their load call (only there) and print `unreadable_message(path, error)`. No torch import
here: the CLIs' seams to the checkpoint module stay replaceable.
"""

from __future__ import annotations

import os
import pickle

UNREADABLE: tuple[type[BaseException], ...] = (pickle.UnpicklingError, EOFError, RuntimeError)

EXPECTED = (
    "an fr-trainer checkpoint: a run directory, a checkpoints/step_XXXXXXXX folder, its "
    "common.pt or a merged checkpoint file"
)


def one_line(error: BaseException, limit: int = 200) -> str:
    """The error's text on one line (torch's messages span several), cut to `limit`."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def unreadable_message(path: str | os.PathLike, error: BaseException) -> str:
    return f"{path} is not a readable checkpoint ({one_line(error)}); expected {EXPECTED}"
