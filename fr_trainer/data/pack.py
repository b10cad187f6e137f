"""Pack a class-per-folder image tree into `train.rec/.idx` (insightface layout).

``IMAGE_DIR/<class>/<image>``: classes are the sub-folders in sorted order, images sorted
by name. Workers read and (by default) fully decode every image; JPEG and PNG bytes are
stored as they are, other formats (or any image when `image_size` asks for a resize) are
re-encoded as JPEG. Images that do not decode are reported (stderr and
`OUT_DIR/bad_images.txt`, with the reason) and skipped, never silently; a class left
without images is dropped and reported. `OUT_DIR/classes.txt` maps label -> folder.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from fr_trainer.data.recordio import IRHeader, RecordWriter, encode_record, pack

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


@dataclass
class PackSummary:
    out_dir: str
    num_images: int = 0
    num_classes: int = 0
    bad: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    dropped_classes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return (self.num_images + len(self.bad)) / self.seconds if self.seconds else 0.0


def list_image_folder(image_dir: str | os.PathLike) -> list[tuple[str, list[Path]]]:
    """(class folder name, sorted image paths) per sub-folder of `image_dir`, sorted by name."""
    root = Path(image_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    classes = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(
            p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        classes.append((folder.name, files))
    if not classes:
        raise ValueError(f"{root} has no class sub-folders; expected IMAGE_DIR/<class>/<image>")
    return classes


def load_image(task: tuple[str, bool, int | None, int]) -> tuple[bytes | None, str | None]:
    """Read (and check) one image: task = (path, verify, image_size, quality) -> (bytes, error)."""
    path, verify, image_size, quality = task
    try:
        data = Path(path).read_bytes()
        if not verify and image_size is None:
            return data, None
        with Image.open(io.BytesIO(data)) as image:
            fmt = image.format
            keep = fmt in ("JPEG", "PNG") and (
                image_size is None or image.size == (image_size, image_size)
            )
            if keep and fmt == "JPEG":  # decode every coefficient, but skip the full-size IDCT
                image.draft("RGB", (max(image.size[0] // 8, 1), max(image.size[1] // 8, 1)))
            image.load()
            if keep:
                return data, None
            image = image.convert("RGB")
            if image_size is not None and image.size != (image_size, image_size):
                image = image.resize((image_size, image_size), Image.BILINEAR)
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=quality)
            return buffer.getvalue(), None
    except Exception as error:  # noqa: BLE001 - any decoder failure is reported, never fatal
        return None, f"{type(error).__name__}: {error}"


def _results(tasks: list, workers: int):
    if workers <= 1:
        yield from map(load_image, tasks)
        return
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with mp.get_context(method).Pool(workers) as pool:
        yield from pool.imap(load_image, tasks, chunksize=64)


def _header(first_identity_key: int, num_classes: int) -> bytes:
    return pack(IRHeader(0, [first_identity_key, first_identity_key + num_classes], 0, 0))


def pack_image_folder(
    image_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    name: str = "train",
    workers: int | None = None,
    verify: bool = True,
    image_size: int | None = None,
    quality: int = 95,
    progress: bool = True,
) -> PackSummary:
    """Write `OUT_DIR/<name>.rec/.idx` from the class-per-folder tree (see the module docstring)."""
    start = time.perf_counter()
    classes = list_image_folder(image_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    workers = (os.cpu_count() or 1) if workers is None else workers
    tasks = [(str(path), verify, image_size, quality) for _, files in classes for path in files]
    owners = [index for index, (_, files) in enumerate(classes) for _ in files]
    summary = PackSummary(str(out))
    rec, idx = out / f"{name}.rec", out / f"{name}.idx"
    ranges: dict[int, list[int]] = {}  # class folder index -> [first, end) keys; label = order
    results = _results(tasks, workers)
    if progress:
        from tqdm import tqdm

        results = tqdm(results, total=len(tasks), desc=f"pack {Path(image_dir).name}", unit="img")
    with RecordWriter(rec, idx) as writer:
        writer.write(0, _header(1, 0))  # placeholder, same size as the final header
        key = 1
        for (path, *_), owner, (data, error) in zip(tasks, owners, results):
            if data is None:
                summary.bad.append((path, error))
                print(f"fr-trainer pack: skipped {path}: {error}", file=sys.stderr)
                continue
            if owner not in ranges:  # classes arrive in folder order: labels stay contiguous
                ranges[owner] = [key, key]
            label = len(ranges) - 1
            writer.write(key, pack(IRHeader(0, float(label), key, 0), data))
            ranges[owner][1] = key + 1
            key += 1
        first_identity_key = key
        for row, owner in enumerate(ranges):
            writer.write(first_identity_key + row, pack(IRHeader(0, ranges[owner], 0, 0)))
    _rewrite_header(rec, _header(first_identity_key, len(ranges)))
    summary.num_images, summary.num_classes = first_identity_key - 1, len(ranges)
    summary.dropped_classes = [classes[i][0] for i in range(len(classes)) if i not in ranges]
    _write_reports(out, classes, list(ranges), summary, image_size)
    summary.seconds = time.perf_counter() - start
    return summary


def _rewrite_header(rec: Path, header: bytes) -> None:
    """Overwrite record 0 in place (header records of positive labels have a fixed size)."""
    record = encode_record(header)
    if len(record) != len(encode_record(_header(1, 0))):
        raise RuntimeError(f"{rec}: the header record changed size; cannot rewrite it in place")
    with open(rec, "r+b") as handle:
        handle.write(record)


def _write_reports(
    out: Path, classes: list, kept: list[int], summary: PackSummary, image_size: int | None
) -> None:
    (out / "classes.txt").write_text(
        "".join(f"{label}\t{classes[i][0]}\n" for label, i in enumerate(kept))
    )
    if image_size is not None:  # insightface's property file: "num_classes,height,width"
        (out / "property").write_text(f"{summary.num_classes},{image_size},{image_size}\n")
    with open(out / "bad_images.txt", "w") as handle:
        handle.writelines(f"{path}\t{reason}\n" for path, reason in summary.bad)
        handle.writelines(
            f"{name}\tclass dropped: no readable image\n" for name in summary.dropped_classes
        )
