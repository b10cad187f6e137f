"""Reading checkpoint files without running code: `torch.load(weights_only=True)` only.

fr_trainer checkpoints hold tensors, numbers, strings and plain containers (the numpy RNG
state is stored as a tensor, see `checkpoint.rng_state`). `load_trusted` accepts exactly
that, plus the three numpy names older checkpoints used for that RNG state (an array of
uint32: `numpy._core.multiarray._reconstruct`, `numpy.ndarray`, `numpy.dtype`, and the
uint32 dtype class), which build arrays and call nothing else; and, in the shard files of
a DeepSpeed run, the three plain data classes of its ZeRO optimizer state (`OPTIONAL`,
imported only when a file names them). Any other global in the pickle (a class,
`os.system`, ...) is refused before it is looked up, so a crafted `.pt` runs nothing: the
load raises `CheckpointError` naming the file.
"""

from __future__ import annotations

import importlib
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, unreadable, untrusted or does not fit the run."""


def _legacy_numpy_globals() -> list:
    """The numpy globals of an RNG state saved by np.random.get_state() (older checkpoints)."""
    names: list = [np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            names.append(importlib.import_module(module)._reconstruct)
            break
        except (ImportError, AttributeError):
            continue
    return names


SAFE_GLOBALS = _legacy_numpy_globals()

# data-only classes in DeepSpeed's ZeRO optimizer state_dict (deepspeed_engine.shard_state)
OPTIONAL = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


def _optional_globals(path: Path) -> list | None:
    """The OPTIONAL classes `path` needs, imported; None when it needs anything else."""
    try:
        wanted = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 (not a zip checkpoint: nothing optional to offer)
        return None
    if not wanted or not set(wanted) <= set(OPTIONAL):
        return None
    try:
        return [getattr(importlib.import_module(n.rsplit(".", 1)[0]), n.rsplit(".", 1)[1]) for n in wanted]
    except (ImportError, AttributeError):
        return None


def load_trusted(path: str | os.PathLike, mmap: bool = False) -> Any:
    """`torch.load(path)` on CPU with weights_only=True and the small allow-list above.

    `mmap=True` maps the tensors' storages instead of reading them (cheap for a file
    read in pieces, e.g. resharding). Raises CheckpointError: missing file; unreadable
    (truncated or corrupt); or not a trusted fr_trainer checkpoint (objects beyond
    tensors and plain containers) -- in which case nothing in it ran.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; the checkpoint is incomplete")
    try:
        try:
            with torch.serialization.safe_globals(SAFE_GLOBALS):
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError:
            extra = _optional_globals(path)
            if extra is None:
                raise
            with torch.serialization.safe_globals(SAFE_GLOBALS + extra):
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if "weights only" in str(error).lower() or "weights_only" in str(error).lower():
            raise CheckpointError(
                f"{path} is not a trusted fr_trainer checkpoint: it is not made of tensors and "
                f"plain containers only ({_unsafe_detail(error)}); nothing in it was run. "
                "Use a checkpoint written by fr_trainer"
            ) from None
        raise CheckpointError(f"{path} is unreadable (truncated or corrupt: {first})") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, KeyError) as error:
        text = str(error).strip().splitlines()
        detail = text[0] if text else type(error).__name__
        raise CheckpointError(f"{path} is unreadable (truncated or corrupt: {detail})") from None


def _unsafe_detail(error: Exception) -> str:
    """The unpickler's reason in one line (e.g. 'Unsupported global: GLOBAL posix.system')."""
    for line in str(error).splitlines():
        line = line.strip()
        if "global" in line.lower() or "unsupported" in line.lower():
            return line[:200]
    return type(error).__name__
