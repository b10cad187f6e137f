"""Restoring the `[regularizer]`'s own state on resume.

- The triplet regularizer's second head is replicated: it is in the checkpoint's common
  part (`common["second_head"]`).
- The center loss's centres are sharded like the head's (`ClassShard` over the classes):
  each shard file holds its rows (`"regularizer"`) and their optimizer state
  (`"optim_regularizer"`). At the saved world size a rank takes its own shard's; at
  another one its rows are cut from whichever shards hold them.

A checkpoint without the state this run's regularizer needs (saved with another
`[regularizer]`) is refused with `CheckpointError`, naming the saved regularizer.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from fr_trainer.regularizers import CenterLoss
from fr_trainer.train import checkpoint as ckpt


def load_regularizer(
    folder: Path,
    common: dict,
    exact: dict,
    saved_world: int,
    world_size: int,
    second_head: nn.Module | None,
    regularizer: nn.Module | None,
) -> dict:
    """Restore `second_head` (the triplet's, None without one) and the centres of a
    `CenterLoss` `regularizer` from the checkpoint in `folder`: `common` is its common
    part, `exact` this rank's shard part, `saved_world` the world size it was saved at,
    `world_size` this run's. Returns the centres' optimizer state by parameter name
    ({} without a center loss)."""
    saved = common.get("regularizer_name", "")
    fix = "resume with the same [regularizer] or set checkpoint.resume=never"
    if second_head is not None:
        if not common.get("second_head"):
            raise ckpt.CheckpointError(
                f"{folder} has no triplet second head (saved regularizer {saved!r}); {fix}"
            )
        second_head.load_state_dict(common["second_head"])
    if not isinstance(regularizer, CenterLoss):
        return {}
    if saved != "center" or (saved_world == world_size and "regularizer" not in exact):
        raise ckpt.CheckpointError(
            f"{folder} has no center-loss centres (saved regularizer {saved!r}); {fix}"
        )
    if saved_world == world_size:
        state, optim = exact["regularizer"], exact.get("optim_regularizer", {})
    else:
        shard = regularizer.shard
        rows = ckpt.load_shard_rows(folder, shard.start, shard.end, "regularizer", "optim_regularizer")
        state, optim = rows["regularizer"], rows["optim_regularizer"]
    try:
        regularizer.load_state_dict(state)
    except RuntimeError as error:
        raise ckpt.CheckpointError(f"{folder}: the centres do not fit ({error}); {fix}") from None
    return optim
