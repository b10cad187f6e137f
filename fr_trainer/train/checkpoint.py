"""Sharded, atomic, reshardable training checkpoints.

Layout of a run's checkpoint folder::

    checkpoints/
      step_00000100/
        common.pt                  rank 0: backbone, its optimizer state, param groups, scaler,
                                   schedule, step, data position, config, backbone recipe
        shard_00000_of_00002.pt    one per rank: its class centres ([start, end) of ClassShard),
                                   their optimizer state, its RNG states
        COMPLETE                   written last
      latest                       text: the name of the newest complete checkpoint

Atomicity: every rank writes into `.tmp_step_XXXXXXXX/`; after a barrier rank 0 writes
COMPLETE, renames the folder into place and then replaces `latest` (write + os.replace).
A kill at any moment leaves `latest` naming a complete checkpoint (or absent). Ranks must
share the file system (one node, or a shared mount).

Resharding: centres and every per-row optimizer tensor (momentum, exp_avg, exp_avg_sq, the
per-row step) are cut by the new world size's `ClassShard`; `merge_shards` /
`split_shards` turn a checkpoint into one file holding the whole head and back.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fr_trainer.distributed.shard import ClassShard

FORMAT = 1
COMMON = "common.pt"
COMPLETE = "COMPLETE"
LATEST = "latest"


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or does not fit the run."""


def shard_name(rank: int, world_size: int) -> str:
    return f"shard_{rank:05d}_of_{world_size:05d}.pt"


def step_name(step: int) -> str:
    return f"step_{step:08d}"


# --------------------------------------------------------------------------- RNG
def rng_state() -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- writing
def _atomic_torch_save(obj: Any, path: Path) -> None:
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)


def _atomic_write_text(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)


def _barrier(group) -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.barrier(group)


def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    common: dict | None,
    shard: dict,
    rank: int,
    world_size: int,
    keep_last: int = 2,
    group=None,
) -> Path:
    """Collective: every rank passes its `shard` dict; rank 0 also `common`.

    Returns the final folder. Older complete checkpoints beyond `keep_last` are removed.
    """
    root = Path(root)
    tmp = root / f".tmp_{step_name(step)}"
    final = root / step_name(step)
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier(group)
    shard = dict(shard, rank=rank, world_size=world_size, format=FORMAT)
    _atomic_torch_save(shard, tmp / shard_name(rank, world_size))
    if rank == 0:
        if common is None:
            raise ValueError("rank 0 must pass the common part of the checkpoint")
        _atomic_torch_save(
            dict(common, world_size=world_size, format=FORMAT, step=step), tmp / COMMON
        )
    _barrier(group)
    if rank == 0:
        _publish(root, tmp, final, world_size)
        _prune(root, keep_last)
    _barrier(group)
    return final


def _publish(root: Path, tmp: Path, final: Path, world_size: int) -> None:
    missing = [
        shard_name(r, world_size)
        for r in range(world_size)
        if not (tmp / shard_name(r, world_size)).is_file()
    ]
    if missing:
        raise CheckpointError(
            f"{tmp}: shards {missing} were not written; is the checkpoint folder on a "
            "file system every rank shares?"
        )
    _atomic_write_text(tmp / COMPLETE, "ok\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _atomic_write_text(root / LATEST, final.name + "\n")


def complete_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoint folders under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if p.is_dir() and (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: p.name)


def _prune(root: Path, keep_last: int) -> None:
    for old in complete_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- finding
def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The checkpoint `latest` names (if complete), else the newest complete one, else None."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / COMPLETE).is_file():
            return candidate
    found = complete_checkpoints(root)
    return found[-1] if found else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder from: the folder itself, a checkpoints root, or a run dir."""
    path = Path(path)
    if (path / COMPLETE).is_file():
        return path
    for root in (path, path / "checkpoints"):
        found = latest_checkpoint(root)
        if found is not None:
            return found
    if (path / COMMON).is_file():
        raise CheckpointError(
            f"{path} has no {COMPLETE} marker: the save was interrupted; use an "
            f"older checkpoint from {path.parent}"
        )
    raise CheckpointError(
        f"no complete checkpoint at {path} (expected a step_XXXXXXXX folder, its "
        "parent 'checkpoints' folder, or a run directory)"
    )


# --------------------------------------------------------------------------- reading
def _load(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; the checkpoint is incomplete") from None


def load_common(folder: str | os.PathLike) -> dict:
    return _load(Path(folder) / COMMON)


def _row_tensors(state: dict, rows: int) -> dict:
    """The entries of a head state dict / optimizer state that are per-class rows."""
    return {
        k: v
        for k, v in state.items()
        if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == rows
    }


def load_shard_rows(
    folder: str | os.PathLike,
    start: int,
    end: int,
    state_key: str = "head",
    optim_key: str = "optim_head",
) -> dict:
    """Head state and head optimizer state for classes [start, end), from whichever shards
    of the saved world size hold them. Returns {"head": {...}, "optim_head": {name: {...}},
    "saved_world_size": W}. Other class-sharded state saved beside the head (the center
    loss's centres: `state_key="regularizer", optim_key="optim_regularizer"`) is read the
    same way and returned under those keys."""
    folder = Path(folder)
    common = load_common(folder)
    saved_world = int(common["world_size"])
    num_classes = int(common["num_classes"])
    if not 0 <= start < end <= num_classes:
        raise CheckpointError(f"class range [{start}, {end}) is outside [0, {num_classes})")
    pieces: list[tuple[dict, dict]] = []
    counts: list[int] = []
    for rank in range(saved_world):
        shard = ClassShard(num_classes, saved_world, rank)
        lo, hi = max(start, shard.start), min(end, shard.end)
        if lo >= hi:
            continue
        data = _load(folder / shard_name(rank, saved_world))
        sl = slice(lo - shard.start, hi - shard.start)
        pieces.append(
            (
                _slice_rows(data[state_key], shard.num_local, sl),
                {
                    name: _slice_rows(st, shard.num_local, sl)
                    for name, st in data[optim_key].items()
                },
            )
        )
        counts.append(hi - lo)
    return {
        state_key: _concat([p[0] for p in pieces], counts),
        optim_key: {
            name: _concat([p[1][name] for p in pieces], counts) for name in pieces[0][1]
        },
        "saved_world_size": saved_world,
    }


def _slice_rows(state: dict, rows: int, sl: slice) -> dict:
    """Cut the per-row tensors of `state` (first dim == rows) to `sl`; keep the rest."""
    row_keys = _row_tensors(state, rows)
    return {k: (v[sl] if k in row_keys else v) for k, v in state.items()}


def _concat(parts: list[dict], counts: list[int]) -> dict:
    """Join per-row tensors of consecutive pieces (piece i has counts[i] rows)."""
    out = {}
    for key, first in parts[0].items():
        rows = [p[key] for p in parts]
        if all(
            isinstance(r, torch.Tensor) and r.dim() >= 1 and r.shape[0] == c
            for r, c in zip(rows, counts)
        ):
            out[key] = torch.cat(rows)
        elif key == "_extra_state":  # the sampling stream of one rank: only exact when unsplit
            out[key] = first if len(parts) == 1 else {"sampling_rng": None}
        else:
            out[key] = first
    return out


def load_shard_exact(folder: str | os.PathLike, rank: int, world_size: int) -> dict | None:
    """This rank's own shard file when the world size is unchanged, else None."""
    path = Path(folder) / shard_name(rank, world_size)
    return _load(path) if path.is_file() else None


# --------------------------------------------------------------------------- merge / split
MERGED_KIND = "fr_trainer.merged_checkpoint"
# class-sharded state saved beside the head in each shard file (the center loss's centres)
SHARDED_EXTRA = ("regularizer", "optim_regularizer")


def merge_shards(folder: str | os.PathLike, out_file: str | os.PathLike) -> Path:
    """One file with the common part, the whole head [num_classes, D] and its optimizer
    state, and every rank's RNG states (kept so a split back to the same world size
    resumes exactly)."""
    folder = resolve_checkpoint(folder)
    common = load_common(folder)
    world = int(common["world_size"])
    rows = load_shard_rows(folder, 0, int(common["num_classes"]))
    per_rank = [
        {
            k: v
            for k, v in _load(folder / shard_name(r, world)).items()
            if k not in ("head", "optim_head", *SHARDED_EXTRA)
        }
        for r in range(world)
    ]
    # class-sharded regularizer state (center-loss centres), merged like the head
    extra_rows = {}
    if "regularizer" in _load(folder / shard_name(0, world)):
        extra_rows = load_shard_rows(folder, 0, int(common["num_classes"]), *SHARDED_EXTRA)
        extra_rows.pop("saved_world_size")
    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    _atomic_torch_save(
        {
            "kind": MERGED_KIND,
            "common": common,
            "head": rows["head"],
            "optim_head": rows["optim_head"],
            "per_rank": per_rank,
            **extra_rows,
        },
        out,
    )
    return out


def split_shards(
    merged_file: str | os.PathLike, out_root: str | os.PathLike, world_size: int
) -> Path:
    """Write a merged file as a complete checkpoint for `world_size` ranks under `out_root`
    (a checkpoints folder; `latest` is set). Returns the checkpoint folder."""
    merged = _load(Path(merged_file))
    if merged.get("kind") != MERGED_KIND:
        raise CheckpointError(f"{merged_file} is not a merged checkpoint (made by merge_shards)")
    common = dict(merged["common"])
    num_classes, step = int(common["num_classes"]), int(common["step"])
    saved_world = int(common["world_size"])
    root = Path(out_root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp_{step_name(step)}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    for rank in range(world_size):
        shard = ClassShard(num_classes, world_size, rank)
        sl = slice(shard.start, shard.end)
        head = _slice_rows(merged["head"], num_classes, sl)
        if world_size != saved_world and "_extra_state" in head:
            head["_extra_state"] = {"sampling_rng": None}
        optim = {n: _slice_rows(st, num_classes, sl) for n, st in merged["optim_head"].items()}
        extra = dict(merged["per_rank"][rank]) if world_size == saved_world else {}
        if SHARDED_EXTRA[0] in merged:  # the centres, cut to this rank's classes
            extra[SHARDED_EXTRA[0]] = _slice_rows(merged[SHARDED_EXTRA[0]], num_classes, sl)
            extra[SHARDED_EXTRA[1]] = {
                n: _slice_rows(st, num_classes, sl) for n, st in merged[SHARDED_EXTRA[1]].items()
            }
        _atomic_torch_save(
            dict(
                extra, head=head, optim_head=optim, rank=rank, world_size=world_size, format=FORMAT
            ),
            tmp / shard_name(rank, world_size),
        )
    if world_size != saved_world:
        common = convert_data_position(common, world_size)
    _atomic_torch_save(dict(common, world_size=world_size), tmp / COMMON)
    final = root / step_name(step)
    _publish(root, tmp, final, world_size)
    return final


def convert_data_position(common: dict, world_size: int) -> dict:
    """Re-express the data position (batches of this rank in the epoch) for a new world
    size: the same number of samples of the epoch's permutation counts as consumed
    (rounded down to whole batches)."""
    common = dict(common)
    data = dict(common.get("data", {}))
    if data:
        samples = int(data["batch_in_epoch"]) * int(data["batch_size"]) * int(common["world_size"])
        data["batch_in_epoch"] = samples // (int(data["batch_size"]) * world_size)
        common["data"] = data
    return common


# --------------------------------------------------------------------------- backbone only
def load_backbone(path: str | os.PathLike) -> nn.Module:
    """The trained backbone (eval mode, fp32, CPU) from a checkpoint folder, a run dir,
    a checkpoints root or a merged file."""
    from fr_trainer.backbones import create_backbone

    path = Path(path)
    if path.is_file():
        obj = _load(path)
        common = obj.get("common") if isinstance(obj, dict) and obj.get("kind") == MERGED_KIND else obj
    else:
        common = load_common(resolve_checkpoint(path))
    if not isinstance(common, dict) or "backbone" not in common or "backbone_name" not in common:
        raise CheckpointError(f"{path} holds no backbone recipe; is it an fr_trainer checkpoint?")
    model = create_backbone(common["backbone_name"], **common.get("backbone_kwargs", {}))
    state = {k.removeprefix("module."): v for k, v in common["backbone"].items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise CheckpointError(f"{path}: the saved weights do not fit backbone {common['backbone_name']!r} "
                              f"({' '.join(str(error).split())[:300]})") from None
    return model.float().eval()
