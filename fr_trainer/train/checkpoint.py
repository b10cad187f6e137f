"""Sharded, atomic, reshardable training checkpoints.

Layout of a run's checkpoint folder::

    checkpoints/
      step_00000100/
        common.pt                  rank 0: backbone (and its EMA), its optimizer state, param
                                   groups, scaler, schedule, step, data position, config,
                                   backbone recipe
        shard_00000_of_00002.pt    one per rank: its class centres ([start, end) of ClassShard),
                                   their optimizer state, its RNG states
        COMPLETE                   written last: the manifest (JSON: each file's size and
                                   CRC-32, the step, the world size, finite true/false)
      latest                       text: the name of the newest complete, finite checkpoint

Atomicity: every rank writes into `.tmp_step_XXXXXXXX/`, reads its file back (weights-only,
memory-mapped) and records its size and CRC-32; rank 0 writes COMPLETE, renames the folder
into place, replaces `latest` (write + os.replace) and only then prunes older checkpoints.
A kill at any moment leaves `latest` naming a complete checkpoint (or absent). Ranks must
share the file system (one node, or a shared mount). Temporary folders of interrupted
saves are removed by the next save. Every decision is taken together: a failure on one
rank (a write error, too little free space) raises `CheckpointError` on every rank, never
a hang.

Integrity and finiteness (`checkpoint_integrity`, `finiteness`):

- save: every rank checks its part for NaN/inf first; a non-finite state is not written
  (`NonFiniteState` on every rank, naming the tensors; `allow_nonfinite=True` writes it
  marked `"finite": false`, which resume, `latest` and pruning never choose or count).
  Rank 0 checks the free space against the state's size first (`CheckpointError` saying
  how much is needed and free). Pruning keeps the `keep_last` newest checkpoints and, in
  any case, the newest one that is not marked non-finite.
- resume (`resume`): the candidates newest first; every rank checks its share of the files
  against the manifest (no unpickling) and all take the newest intact one, with a warning
  naming each bad file; a checkpoint whose loaded state holds NaN/inf
  (`NonFiniteCheckpoint`, raised by the loader on every rank) falls back to the next one.
- reading: `load_file` = `torch.load(weights_only=True)` with a tiny numpy allow-list
  (`checkpoint_io`): a crafted `.pt` raises CheckpointError naming it and runs nothing.

Resharding: centres and every per-row optimizer tensor (momentum, exp_avg, exp_avg_sq, the
per-row step) are cut by the new world size's `ClassShard`; `merge_shards` /
`split_shards` turn a checkpoint into one file holding the whole head and back.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fr_trainer.distributed.agree import gather_strings, sum_int
from fr_trainer.distributed.shard import ClassShard
from fr_trainer.train import checkpoint_integrity as integrity
from fr_trainer.train.checkpoint_io import CheckpointError, load_trusted
from fr_trainer.train.finiteness import NonFiniteState, describe, nonfinite_entries

FORMAT = 1
COMMON = "common.pt"
COMPLETE = "COMPLETE"
LATEST = "latest"


class NonFiniteCheckpoint(CheckpointError):
    """A checkpoint whose weights, buffers or optimizer state hold NaN/inf."""


def load_file(path: str | os.PathLike, mmap: bool = False) -> Any:
    """One checkpoint file, weights-only (see `checkpoint_io.load_trusted`); `mmap=True`
    maps the storages instead of reading them."""
    return load_trusted(path, mmap=mmap)


def shard_name(rank: int, world_size: int) -> str:
    return f"shard_{rank:05d}_of_{world_size:05d}.pt"


def step_name(step: int) -> str:
    return f"step_{step:08d}"


# --------------------------------------------------------------------------- RNG
def rng_state() -> dict:
    """This process's RNG states, in types a weights-only load accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this rank's own (current) GPU only
    return state


def _own_cuda_rng(saved: torch.Tensor | list | tuple) -> torch.Tensor | None:
    """The saved CUDA generator state of this rank's current GPU. Checkpoints before
    session 10 hold a list, one per visible GPU (the saving rank's among them, at its
    index); a GPU beyond that list keeps its seeded state."""
    if isinstance(saved, torch.Tensor):
        return saved
    index = torch.cuda.current_device()
    return saved[index] if index < len(saved) else None


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    saved = state["numpy"]
    if isinstance(saved, dict):
        keys = saved["keys"].numpy().astype(np.uint32)
        saved = (saved["kind"], keys, saved["pos"], saved["has_gauss"], saved["cached_gaussian"])
    np.random.set_state(saved)  # older checkpoints: the tuple of np.random.get_state()
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        own = _own_cuda_rng(state["cuda"])
        if own is not None:
            torch.cuda.set_rng_state(own)  # the current device: set_rng_state_all would seed other ranks' GPUs


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


def _save_file(obj: Any, path: Path) -> None:
    """Write `obj` atomically, read it back and record its size and CRC-32 (sidecar)."""
    _atomic_torch_save(obj, path)
    integrity.record_digest(path)


def _attempt(action: Callable[[], Any]) -> str:
    """'' when `action()` succeeds, else its error as one line (raised later on every rank)."""
    try:
        action()
    except Exception as error:  # noqa: BLE001 (reported to every rank, then raised)
        return f"{type(error).__name__}: {error}" if not isinstance(error, CheckpointError) else str(error)
    return ""


def _raise_if_any(problems: list[str]) -> None:
    bad = [f"rank {r}: {p}" if len(problems) > 1 else p for r, p in enumerate(problems) if p]
    if bad:
        raise CheckpointError("; ".join(bad))


def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    common: dict | None,
    shard: dict,
    rank: int,
    world_size: int,
    keep_last: int = 2,
    group=None,
    allow_nonfinite: bool = False,
) -> Path:
    """Collective: every rank passes its `shard` dict; rank 0 also `common`.

    Returns the final folder. Raises, on every rank: NonFiniteState when some rank's part
    holds NaN/inf (nothing is written; with `allow_nonfinite` it is written marked
    non-finite instead), CheckpointError when the disk lacks room or a write fails.
    Older complete checkpoints beyond `keep_last` are removed after the new one is in place.
    """
    root = Path(root)
    tmp = root / f".tmp_{step_name(step)}"
    final = root / step_name(step)
    if rank == 0 and common is None:
        raise ValueError("rank 0 must pass the common part of the checkpoint")
    bad = nonfinite_entries({"common": common or {}, "shard": shard})
    reports = gather_strings(describe(bad) if bad else "", group)
    finite = not any(reports)
    if not finite and not allow_nonfinite:
        where = "; ".join(f"rank {r}: {t}" for r, t in enumerate(reports) if t)
        keep = latest_checkpoint(root)
        raise NonFiniteState(
            f"not saving checkpoint {final.name}: NaN/inf in {where}; the newest finite "
            f"checkpoint is {keep if keep else 'none'}"
        )
    needed = sum_int(estimate_checkpoint_nbytes(common, shard), group)

    def prepare() -> None:
        root.mkdir(parents=True, exist_ok=True)
        integrity.clean_stale(root)
        problem = integrity.free_space_problem(root, needed, f"checkpoint {final.name}", keep_last)
        if problem:
            raise CheckpointError(problem)
        tmp.mkdir()

    _raise_if_any(gather_strings(_attempt(prepare) if rank == 0 else "", group))

    def write() -> None:
        part = dict(shard, rank=rank, world_size=world_size, format=FORMAT)
        _save_file(part, tmp / shard_name(rank, world_size))
        if rank == 0:
            _save_file(dict(common, world_size=world_size, format=FORMAT, step=step), tmp / COMMON)

    _raise_if_any(gather_strings(_attempt(write), group))

    def publish() -> None:
        _publish(root, tmp, final, world_size, step, finite)
        if finite:
            _prune(root, keep_last)

    _raise_if_any(gather_strings(_attempt(publish) if rank == 0 else "", group))
    return final


def estimate_checkpoint_nbytes(common: dict | None, shard: dict) -> int:
    """Bytes this rank's files of a checkpoint will take (tensor sizes + a little)."""
    return integrity.estimate_nbytes(shard) + integrity.estimate_nbytes(common or {}) + (64 << 10)


def _publish(
    root: Path, tmp: Path, final: Path, world_size: int, step: int, finite: bool = True
) -> None:
    names = [COMMON] + [shard_name(r, world_size) for r in range(world_size)]
    manifest = integrity.build_manifest(tmp, names, step, world_size, finite)
    _atomic_write_text(tmp / COMPLETE, json.dumps(manifest, indent=1) + "\n")
    integrity.remove_sidecars(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    if finite:
        _atomic_write_text(root / LATEST, final.name + "\n")


def complete_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoint folders under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if p.is_dir() and (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: p.name)


def _prune(root: Path, keep_last: int) -> None:
    """Remove all but the `keep_last` newest complete checkpoints, never the newest one
    that is not marked non-finite."""
    found = complete_checkpoints(root)
    keep = set(found[-keep_last:])
    usable = [p for p in found if not integrity.marked_nonfinite(p)]
    if usable:
        keep.add(usable[-1])
    for old in found:
        if old not in keep:
            shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- finding
def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The checkpoint `latest` names (if complete), else the newest complete one, else None;
    checkpoints marked non-finite are never returned. (No file is read: a resume checks
    them with `resume`.)"""
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / COMPLETE).is_file() and not integrity.marked_nonfinite(candidate):
            return candidate
    found = [p for p in complete_checkpoints(root) if not integrity.marked_nonfinite(p)]
    return found[-1] if found else None


def resume_candidates(path: str | os.PathLike) -> list[Path]:
    """Where a resume named by `checkpoint.resume=PATH` may start, newest first: a
    checkpoint folder itself (only it), or the complete checkpoints of a checkpoints root
    or a run directory; CheckpointError (as `resolve_checkpoint`) when it holds none."""
    path = Path(path)
    if (path / COMPLETE).is_file():
        return [path]
    for root in (path, path / "checkpoints"):
        found = complete_checkpoints(root)
        if found:
            return found[::-1]
    resolve_checkpoint(path)  # raises with the reason
    return []


def resume(
    candidates: list[Path],
    load: Callable[[Path], None],
    rank: int,
    world_size: int,
    group=None,
) -> tuple[Path | None, list[str]]:
    """Collective: `load(folder)` the newest of `candidates` that every rank finds intact
    and whose state is finite (`load` raises NonFiniteCheckpoint on every rank otherwise);
    returns it and the warnings (one per rejected checkpoint, naming the bad file, then
    which one was used). (None, []) when rank 0 has no candidates; CheckpointError when
    none of them is usable."""
    names = gather_strings("\n".join(str(c) for c in candidates), group)[0]
    remaining = [Path(c) for c in names.split("\n") if c]  # rank 0's list counts
    if not remaining:
        return None, []
    notes: list[str] = []
    while remaining:
        folder, more = integrity.choose_readable(remaining, rank, world_size, group)
        notes += more
        if folder is None:
            break
        try:
            load(folder)
        except NonFiniteCheckpoint as error:
            notes.append(f"not resuming from {folder}: {error}")
            remaining = remaining[remaining.index(folder) + 1 :]
            continue
        if notes:
            notes.append(f"resuming from {folder} instead")
        return folder, notes
    raise CheckpointError(
        "no usable checkpoint to resume from: " + "; ".join(notes)
        + "; remove the bad ones, name a good one in checkpoint.resume, or set "
        "checkpoint.resume=never to start afresh"
    )


def refuse_nonfinite(folder: Path, loaded: dict, group=None) -> None:
    """Collective: NonFiniteCheckpoint on every rank when any rank's `loaded` parts of
    `folder` hold NaN/inf."""
    bad = nonfinite_entries(loaded)
    reports = gather_strings(describe(bad) if bad else "", group)
    if any(reports):
        where = "; ".join(f"rank {r}: {t}" for r, t in enumerate(reports) if t)
        raise NonFiniteCheckpoint(f"{folder} holds NaN/inf ({where})")


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
def _load(path: Path, mmap: bool = False) -> dict:
    return load_trusted(path, mmap=mmap)


def load_common(folder: str | os.PathLike, mmap: bool = False) -> dict:
    return _load(Path(folder) / COMMON, mmap)


def _row_tensors(state: dict, rows: int) -> dict:
    """The entries of a head state dict / optimizer state that are per-class rows."""
    return {
        k: v
        for k, v in state.items()
        if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == rows
    }


RESHARD_CHUNK_BYTES = 8 << 20  # bytes of rows copied per mapping of an old shard file


def load_shard_rows(
    folder: str | os.PathLike,
    start: int,
    end: int,
    state_key: str = "head",
    optim_key: str = "optim_head",
    chunk_bytes: int = RESHARD_CHUNK_BYTES,
) -> dict:
    """Head state and head optimizer state for classes [start, end), from whichever shards
    of the saved world size hold them. Returns {"head": {...}, "optim_head": {name: {...}},
    "saved_world_size": W}. Other class-sharded state saved beside the head (the center
    loss's centres: `state_key="regularizer", optim_key="optim_regularizer"`) is read the
    same way and returned under those keys.

    Memory: an old shard file (40 GB at 10M classes per rank) is never read whole. It is
    memory-mapped (`torch.load(mmap=True)`) and its rows are copied `chunk_bytes` at a time,
    each chunk through a fresh mapping dropped after the copy, so the host holds the new
    rows plus one chunk.

    The sampling stream (`_extra_state`) is kept only when [start, end) is exactly one saved
    shard; otherwise it is `{"sampling_rng": None, "reseed_step": step}` and the head draws
    a new stream for its rank (see `PartialFC.set_extra_state`)."""
    folder = Path(folder)
    common = load_common(folder)
    saved_world = int(common["world_size"])
    num_classes = int(common["num_classes"])
    if not 0 <= start < end <= num_classes:
        raise CheckpointError(f"class range [{start}, {end}) is outside [0, {num_classes})")
    shards = [ClassShard(num_classes, saved_world, r) for r in range(saved_world)]
    shards = [s for s in shards if max(start, s.start) < min(end, s.end)]
    out = _Rows(start, end, state_key, optim_key)
    for shard in shards:
        row, hi = max(start, shard.start), min(end, shard.end)
        path = folder / shard_name(shard.rank, saved_world)
        while row < hi:
            row = out.copy_chunk(path, shard, row, hi, chunk_bytes)
    extra = (state_key, "_extra_state")
    if extra in out.values and not (len(shards) == 1 and (shards[0].start, shards[0].end) == (start, end)):
        out.values[extra] = {"sampling_rng": None, "reseed_step": int(common.get("step", 0))}
    return {**out.nested(), "saved_world_size": saved_world}


def _is_rows(value: Any, rows: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == rows


def _owned(value: Any) -> Any:
    """`value` with its tensors copied out of the file mapping."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: _owned(v) for k, v in value.items()}
    return value


class _Rows:
    """The state of classes [start, end) assembled from old shard files, chunk by chunk.

    `values` maps (state_key, key) and (optim_key, param name, key) to a value: the per-row
    tensors [end - start, ...] (filled by `copy_chunk`), and the other entries as the first
    shard file read holds them."""

    def __init__(self, start: int, end: int, state_key: str, optim_key: str) -> None:
        self.start, self.end = start, end
        self.state_key, self.optim_key = state_key, optim_key
        self.values: dict[tuple, Any] = {}
        self.row_keys: set[tuple] = set()
        self.optim_names: list[str] | None = None  # None until the first file is read

    def _leaves(self, data: dict) -> dict[tuple, Any]:
        leaves: dict[tuple, Any] = {(self.state_key, k): v for k, v in data[self.state_key].items()}
        for name, state in data[self.optim_key].items():
            leaves.update({(self.optim_key, name, k): v for k, v in state.items()})
        return leaves

    def copy_chunk(self, path: Path, shard: ClassShard, row: int, hi: int, chunk_bytes: int) -> int:
        """Map `path` (the file of old `shard`), copy its classes [row, row + chunk), at most
        `hi`, and return the next class. The mapping is dropped on return."""
        data = _load(path, mmap=True)
        leaves = self._leaves(data)
        rows = {k: v for k, v in leaves.items() if _is_rows(v, shard.num_local)}
        if self.optim_names is None:
            self.optim_names = list(data[self.optim_key])
            self.row_keys = set(rows)
            for key, value in leaves.items():
                self.values[key] = (torch.empty((self.end - self.start, *value.shape[1:]), dtype=value.dtype)
                                    if key in rows else _owned(value))
        row_bytes = sum(v[0].numel() * v.element_size() for v in rows.values())
        stop = min(hi, row + max(1, chunk_bytes // max(1, row_bytes)))
        for key in self.row_keys:
            source, target = rows.get(key), self.values[key]
            if source is None or source.shape[1:] != target.shape[1:] or source.dtype != target.dtype:
                raise CheckpointError(
                    f"{path}: {'/'.join(map(str, key))} does not match the other shards' rows; "
                    "the checkpoint is inconsistent (written by different runs?)"
                )
            target[row - self.start : stop - self.start].copy_(source[row - shard.start : stop - shard.start])
        return stop

    def nested(self) -> dict:
        """{state_key: {key: value}, optim_key: {param name: {key: value}}}."""
        result: dict[str, dict] = {self.state_key: {}, self.optim_key: {n: {} for n in self.optim_names or []}}
        for key, value in self.values.items():
            if key[0] == self.state_key and len(key) == 2:
                result[self.state_key][key[1]] = value
            else:
                result[self.optim_key].setdefault(key[1], {})[key[2]] = value
        return result


def _slice_rows(state: dict, rows: int, sl: slice) -> dict:
    """Cut the per-row tensors of `state` (first dim == rows) to `sl`; keep the rest."""
    row_keys = _row_tensors(state, rows)
    return {k: (v[sl] if k in row_keys else v) for k, v in state.items()}


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
    integrity.clean_stale(root)
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
        _save_file(
            dict(
                extra, head=head, optim_head=optim, rank=rank, world_size=world_size, format=FORMAT
            ),
            tmp / shard_name(rank, world_size),
        )
    if world_size != saved_world:
        common = convert_data_position(common, world_size)
    _save_file(dict(common, world_size=world_size), tmp / COMMON)
    final = root / step_name(step)
    _publish(root, tmp, final, world_size, step, not nonfinite_entries(merged))
    return final


def write_offline(
    out_root: str | os.PathLike, step: int, common: dict, shards: Iterable[dict], world_size: int
) -> Path:
    """Write a complete checkpoint for `world_size` ranks from one process (converters such
    as `import_insightface`): `shards` yields each rank's shard dict in rank order (one in
    memory at a time). `latest` is set. Returns the checkpoint folder."""
    root = Path(out_root)
    root.mkdir(parents=True, exist_ok=True)
    integrity.clean_stale(root)
    tmp = root / f".tmp_{step_name(step)}"
    tmp.mkdir()
    count = 0
    for rank, shard in enumerate(shards):
        part = dict(shard, rank=rank, world_size=world_size, format=FORMAT)
        _save_file(part, tmp / shard_name(rank, world_size))
        count += 1
    if count != world_size:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"write_offline: {count} shards for world size {world_size}")
    _save_file(dict(common, world_size=world_size, format=FORMAT, step=step), tmp / COMMON)
    final = root / step_name(step)
    _publish(root, tmp, final, world_size, step)
    return final


def convert_data_position(common: dict, world_size: int) -> dict:
    """Re-express the data position (batches of this rank in the epoch) for a new world
    size: the same number of samples of the epoch's permutation counts as consumed
    (rounded down to whole batches)."""
    common = dict(common)
    data = dict(common.get("data", {}))
    if data and "consumed" not in data:  # job-wide positions need no conversion
        samples = int(data["batch_in_epoch"]) * int(data["batch_size"]) * int(common["world_size"])
        data["batch_in_epoch"] = samples // (int(data["batch_size"]) * world_size)
        common["data"] = data
    return common


# --------------------------------------------------------------------------- backbone only
def load_backbone(path: str | os.PathLike, ema: bool = False) -> nn.Module:
    """The trained backbone (eval mode, fp32, CPU) from a checkpoint folder, a run dir,
    a checkpoints root or a merged file; `ema=True`: the moving average of its weights
    (`model.ema_decay`; CheckpointError when the run kept none)."""
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
    weights = common["backbone"]
    if ema:
        if not common.get("ema"):
            raise CheckpointError(f"{path} has no EMA of the backbone (the run was trained with "
                                  "model.ema_decay = 0); drop --ema to use its weights")
        weights = common["ema"]["backbone"]
    state = {k.removeprefix("module."): v for k, v in weights.items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise CheckpointError(f"{path}: the saved weights do not fit backbone {common['backbone_name']!r} "
                              f"({' '.join(str(error).split())[:300]})") from None
    return model.float().eval()
