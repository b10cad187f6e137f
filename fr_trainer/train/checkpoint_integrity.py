"""Knowing a checkpoint is whole before trusting it; choosing one every rank can read.

Manifest: `COMPLETE` (written last, see `checkpoint`) holds JSON::

    {"kind": "fr_trainer.checkpoint", "step": 80, "world_size": 2, "finite": true,
     "files": {"common.pt": {"size": 123, "crc32": "0a1b2c3d"}, "shard_00000_of_00002.pt": ...}}

Each rank, after writing its file, opens it again (weights-only, memory-mapped: the zip
structure and the pickle are checked, no tensor is read) and records its size and CRC-32
in a `<file>.sum` sidecar; rank 0 gathers the sidecars into the manifest. Verifying a
checkpoint then needs no unpickling: sizes and CRC-32 of every file, the work spread over
the ranks (file i is checked by rank i mod world size). Older checkpoints whose COMPLETE
says only "ok" are checked by opening their files the same way.

Choosing (`choose_readable`): candidates newest first; every rank checks its files of the
candidate and the ranks exchange their findings (`fr_trainer.distributed.agree`), so all
take the same one: the newest whose every file is intact and that is not marked
non-finite. Each rejected one gives a warning naming the bad file.

Also here: `clean_stale` (temporary folders and partial files of interrupted saves, which
must never block a rerun) and `free_space_problem` (a save that would not fit).
"""

from __future__ import annotations

import json
import re
import shutil
import zlib
from pathlib import Path
from typing import Any

import torch

from fr_trainer.distributed.agree import gather_strings
from fr_trainer.train.checkpoint_io import CheckpointError, load_trusted

COMPLETE = "COMPLETE"
SUM_SUFFIX = ".sum"
MANIFEST_KIND = "fr_trainer.checkpoint"
TMP_PREFIX = ".tmp_step_"
_CHUNK = 1 << 22


# --------------------------------------------------------------------------- digests
def file_digest(path: Path) -> dict[str, Any]:
    """{"size": bytes, "crc32": 8 hex digits} of a file."""
    crc = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return {"size": path.stat().st_size, "crc32": f"{crc:08x}"}


def record_digest(path: Path) -> None:
    """Check that `path` reads back (weights-only, memory-mapped) and write its sidecar."""
    load_trusted(path, mmap=True)
    sidecar = path.with_name(path.name + SUM_SUFFIX)
    sidecar.write_text(json.dumps(file_digest(path)) + "\n")


def build_manifest(folder: Path, names: list[str], step: int, world_size: int, finite: bool) -> dict:
    """The manifest of `names` in `folder` from their sidecars; CheckpointError when a file
    or its sidecar is missing or the file's size changed since it was checked."""
    files = {}
    for name in names:
        path, sidecar = folder / name, folder / (name + SUM_SUFFIX)
        if not path.is_file() or not sidecar.is_file():
            raise CheckpointError(
                f"{path} was not written (or not checked); is the checkpoint folder on a "
                "file system every rank shares?"
            )
        digest = json.loads(sidecar.read_text())
        if path.stat().st_size != digest["size"]:
            raise CheckpointError(f"{path} changed size after it was written and checked")
        files[name] = digest
    return {"kind": MANIFEST_KIND, "step": step, "world_size": world_size, "finite": finite,
            "files": files}


def remove_sidecars(folder: Path) -> None:
    for sidecar in folder.glob("*" + SUM_SUFFIX):
        sidecar.unlink(missing_ok=True)


def read_manifest(folder: Path) -> dict | None:
    """The manifest in `folder`/COMPLETE; None for an older checkpoint ("ok") or none."""
    try:
        data = json.loads((folder / COMPLETE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("kind") == MANIFEST_KIND else None


def marked_nonfinite(folder: Path) -> bool:
    """True when the checkpoint's manifest says it holds NaN/inf."""
    manifest = read_manifest(folder)
    return manifest is not None and manifest.get("finite") is False


# --------------------------------------------------------------------------- verifying
_SHARD = re.compile(r"shard_(\d{5})_of_(\d{5})\.pt")


def _legacy_files(folder: Path) -> tuple[list[str], list[str]]:
    """(files present, files missing) of a checkpoint without a manifest."""
    present = sorted(p.name for p in folder.glob("*.pt"))
    worlds = {int(m.group(2)) for m in map(_SHARD.fullmatch, present) if m}
    expected = {"common.pt"} | {
        f"shard_{r:05d}_of_{w:05d}.pt" for w in worlds for r in range(w)
    }
    if not worlds:
        expected.add("shard_00000_of_00001.pt")  # at least one shard
    return present, sorted(expected - set(present))


def check_file(folder: Path, name: str, manifest: dict | None) -> str:
    """'' when `folder`/`name` is intact, else what is wrong (naming the file)."""
    path = folder / name
    try:
        if not path.is_file():
            return f"{path} is missing"
        if manifest is None:
            load_trusted(path, mmap=True)
            return ""
        expected = manifest["files"][name]
        size = path.stat().st_size
        if size != expected["size"]:
            return f"{path} is truncated or changed: {size} bytes, the manifest says {expected['size']}"
        actual = file_digest(path)["crc32"]
        if actual != expected["crc32"]:
            return f"{path} is corrupt: CRC-32 {actual}, the manifest says {expected['crc32']}"
        return ""
    except Exception as error:  # noqa: BLE001 (any failure to read means: do not use it)
        return f"{path}: {error}"


def local_problems(folder: Path, rank: int, world_size: int) -> str:
    """What is wrong with the files of `folder` that this rank checks ('' if nothing)."""
    try:
        if marked_nonfinite(folder):
            return f"{folder} is marked non-finite (NaN/inf in its weights)"
        manifest = read_manifest(folder)
        if manifest is None:
            names, missing = _legacy_files(folder)
            if missing:
                return f"{folder} lacks {', '.join(missing)}"
        else:
            names = sorted(manifest["files"])
        mine = [n for i, n in enumerate(names) if i % world_size == rank]
        return "; ".join(p for p in (check_file(folder, n, manifest) for n in mine) if p)
    except Exception as error:  # noqa: BLE001
        return f"{folder}: {error}"


def choose_readable(
    candidates: list[Path], rank: int, world_size: int, group=None
) -> tuple[Path | None, list[str]]:
    """Collective: the first of `candidates` (newest first; the same list on every rank,
    see `checkpoint.resume`) that every rank finds intact, and a warning per rejected one."""
    notes = []
    for folder in candidates:
        problems = [p for p in gather_strings(local_problems(folder, rank, world_size), group) if p]
        if not problems:
            return folder, notes
        notes.append(f"not resuming from {folder}: {'; '.join(problems)}")
    return None, notes


# --------------------------------------------------------------------------- housekeeping
def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def clean_stale(root: Path) -> list[str]:
    """Remove what interrupted saves left in `root` (temporary step folders, *.partial
    files); returns their names. A save is collective, so none is in progress when a save
    or a resume calls this on rank 0."""
    if not root.is_dir():
        return []
    removed = []
    for path in sorted(root.iterdir()):
        if path.name.startswith(TMP_PREFIX) or path.name.endswith(".partial"):
            try:
                _remove(path)
            except OSError as error:
                raise CheckpointError(
                    f"cannot remove {path}, left by an interrupted save ({error}); remove it by hand"
                ) from None
            removed.append(path.name)
    return removed


def estimate_nbytes(state: Any) -> int:
    """Bytes the tensors in a (nested) state take in a file (+ a little per tensor)."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size() + 512
    if isinstance(state, dict):
        return sum(estimate_nbytes(v) for v in state.values()) + 64
    if isinstance(state, (list, tuple)):
        return sum(estimate_nbytes(v) for v in state) + 64
    return 64


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def free_space_problem(root: Path, needed: int, what: str, keep_last: int) -> str:
    """'' when `root`'s file system has room for `needed` bytes (+5% and 16 MiB), else
    the error to raise."""
    usage = shutil.disk_usage(root)
    want = int(needed * 1.05) + (16 << 20)
    if usage.free >= want:
        return ""
    return (
        f"not enough free space for {what} in {root}: it needs about {_gib(want)}, "
        f"{_gib(usage.free)} is free; free some space, lower checkpoint.keep_last "
        f"(now {keep_last}; older checkpoints are removed only after the new one is written) "
        "or point run.output_dir at a larger disk"
    )
