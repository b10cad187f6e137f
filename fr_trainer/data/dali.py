"""NVIDIA DALI pipeline over a `.rec` (`dali` extra: nvidia-dali-cuda130).

`fn.readers.mxnet` takes every record listed in its index as an image and sizes each
record by the gap to the next listed offset, so the header and identity records of the
insightface layout break it. `image_index(rec, idx)` writes (once, cached next to the data
as `<name>.dali.idx`, or under `~/.cache/fr_trainer` when that folder is read-only) an
index listing only the image records; the `.rec` itself is never rewritten.

`DaliLoader(rec, batch_size=..., rank=..., world_size=...)` shards the reader by rank,
decodes on the GPU (`mixed`) when CUDA is present and on the CPU otherwise, flips at
random, normalises to `(x/255-0.5)/0.5` and yields `(images float32 [B,3,H,W], labels
int64 [B])` as torch tensors (on the GPU for GPU pipelines).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from fr_trainer.data.layout import read_layout
from fr_trainer.data.recordio import RecordReader


def _import_dali():
    try:
        from nvidia import dali  # noqa: F401
        from nvidia.dali import fn, types
        from nvidia.dali.pipeline import pipeline_def
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
    except ImportError as error:
        raise ImportError(
            "the DALI pipeline needs NVIDIA DALI: pip install 'fr_trainer[dali]' "
            "(nvidia-dali-cuda130), or use the torch loader (fr_trainer.data.loader)"
        ) from error
    return fn, types, pipeline_def, DALIGenericIterator, LastBatchPolicy


def normalize_faces(fn, types, images, mirror):
    """DALI ops: HWC uint8 faces -> CHW float in [-1, 1] ((x - 127.5) / 127.5, the torch
    path's normalisation), mirrored where `mirror` is 1. `fn`/`types` are nvidia.dali's."""
    return fn.crop_mirror_normalize(
        images, dtype=types.FLOAT, output_layout="CHW", mean=[127.5] * 3, std=[127.5] * 3, mirror=mirror,
    )


def _cache_candidates(rec_path: Path) -> list[Path]:
    beside = rec_path.with_name(rec_path.stem + ".dali.idx")
    digest = hashlib.sha1(str(rec_path.resolve()).encode()).hexdigest()[:16]
    home = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fr_trainer"
    return [beside, home / f"{rec_path.stem}-{digest}.dali.idx"]


def _fresh(path: Path, sources: list[Path]) -> bool:
    if not path.is_file():
        return False
    mtime = path.stat().st_mtime
    return all(source.stat().st_mtime <= mtime for source in sources)


def image_index(
    rec_path: str | os.PathLike,
    idx_path: str | os.PathLike | None = None,
    out_path: str | os.PathLike | None = None,
) -> Path:
    """Path of an index that lists only the image records of `rec_path` (built if stale).

    For a file without the insightface header this is the original index's records.
    """
    rec = Path(rec_path)
    idx = Path(idx_path) if idx_path is not None else rec.with_suffix(".idx")
    candidates = [Path(out_path)] if out_path is not None else _cache_candidates(rec)
    for candidate in candidates:
        if _fresh(candidate, [rec, idx]):
            return candidate
    with RecordReader(rec, idx) as reader:
        layout = read_layout(reader)
        lines = "".join(f"{int(key)}\t{reader.offset(int(key))}\n" for key in layout.image_keys)
    errors = []
    for candidate in candidates:
        try:
            candidate.parent.mkdir(parents=True, exist_ok=True)
            temporary = candidate.with_name(f"{candidate.name}.{os.getpid()}.tmp")
            temporary.write_text(lines)
            os.replace(temporary, candidate)  # atomic: ranks may race to build it
            return candidate
        except OSError as error:
            errors.append(f"{candidate}: {error}")
    raise OSError("cannot write the DALI image index anywhere: " + "; ".join(errors))


def dali_device(device: str = "auto") -> str:
    """ "gpu" when asked or when CUDA is present under "auto", else "cpu"."""
    if device == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "gpu"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'gpu', got {device!r}")
    return device


def build_pipeline(
    rec_path: str | os.PathLike,
    index_path: str | os.PathLike,
    *,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    num_threads: int = 2,
    device: str = "auto",
    image_size: int | None = None,
    flip: bool = True,
    shuffle: bool = True,
    initial_fill: int = 1024,
    prefetch_queue_depth: int = 2,
):
    """A built DALI pipeline with outputs ("images" float [3,H,W], "labels" int64 scalar).

    `index_path` must list image records only (see `image_index`). `image_size` resizes
    (None: keep the stored size). `device="cpu"` runs with no GPU at all.
    """
    fn, types, pipeline_def, _, _ = _import_dali()
    device = dali_device(device)
    device_id = (
        (torch.cuda.current_device() if torch.cuda.is_available() else 0)
        if device == "gpu"
        else None
    )

    @pipeline_def(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device_id,
        seed=seed * 1009 + rank,
        prefetch_queue_depth=prefetch_queue_depth,
    )
    def face_pipeline():
        jpegs, labels = fn.readers.mxnet(
            path=[str(rec_path)],
            index_path=[str(index_path)],
            shard_id=rank,
            num_shards=world_size,
            random_shuffle=shuffle,
            initial_fill=initial_fill,
            name="Reader",
        )
        images = fn.decoders.image(
            jpegs, device="mixed" if device == "gpu" else "cpu", output_type=types.RGB
        )
        if image_size is not None:
            images = fn.resize(images, resize_x=image_size, resize_y=image_size)
        mirror = fn.random.coin_flip(probability=0.5) if flip else 0
        images = normalize_faces(fn, types, images, mirror)
        labels = fn.cast(labels[0], dtype=types.INT64)
        if device == "gpu":
            labels = labels.gpu()
        return images, labels

    pipeline = face_pipeline()
    pipeline.build()
    return pipeline


class DaliLoader:
    """Iterates a DALI pipeline as torch batches; one pass over this rank's shard per epoch."""

    def __init__(
        self,
        rec_path: str | os.PathLike,
        idx_path: str | os.PathLike | None = None,
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        num_threads: int = 2,
        device: str = "auto",
        image_size: int | None = None,
        flip: bool = True,
        shuffle: bool = True,
        drop_last: bool = True,
        initial_fill: int = 1024,
    ) -> None:
        _, _, _, iterator_class, policy = _import_dali()
        self.index_path = image_index(rec_path, idx_path)
        self.pipeline = build_pipeline(
            rec_path,
            self.index_path,
            batch_size=batch_size,
            rank=rank,
            world_size=world_size,
            seed=seed,
            num_threads=num_threads,
            device=device,
            image_size=image_size,
            flip=flip,
            shuffle=shuffle,
            initial_fill=initial_fill,
        )
        self.iterator = iterator_class(
            [self.pipeline],
            ["images", "labels"],
            reader_name="Reader",
            auto_reset=True,
            last_batch_policy=policy.DROP if drop_last else policy.PARTIAL,
        )

    def __len__(self) -> int:
        return len(self.iterator)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in self.iterator:
            yield batch[0]["images"], batch[0]["labels"].reshape(-1).long()
