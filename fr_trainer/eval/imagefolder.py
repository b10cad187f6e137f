"""Aligned face crops on disk: class-per-folder trees and flat lists, decoded lazily.

    paths, labels, names = list_class_folders(root)      # root/<class>/<image>.jpg
    images = ImageList(paths)                             # images[a:b] -> uint8 [n, 112, 112, 3]

Images must be aligned 112x112 RGB crops (the insightface layout of the evaluation
sets); anything else is refused with the path and the size found.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


def list_images(root: str | os.PathLike) -> list[Path]:
    """Every image under `root` (recursively), sorted by relative path."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image directory {root} does not exist")
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def list_class_folders(root: str | os.PathLike) -> tuple[list[Path], np.ndarray, list[str]]:
    """(image paths, labels [N] int64, class names) of `root/<class>/<images...>`."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image directory {root} does not exist (expected root/<class>/<image>)")
    names = sorted(d.name for d in root.iterdir() if d.is_dir())
    paths: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(names):
        files = list_images(root / name)
        paths.extend(files)
        labels.extend([label] * len(files))
    if not paths:
        raise ValueError(f"no images under {root}/<class>/ (looked for {', '.join(IMAGE_SUFFIXES)})")
    return paths, np.asarray(labels, dtype=np.int64), names


def read_noise_list(path: str | os.PathLike | None) -> set[str]:
    """Entries of a noise list: one image path (relative to its set's root) or id per line."""
    if path is None:
        return set()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"noise list {path} does not exist")
    return {line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")}


def is_noise(relative: str, noise: set[str]) -> bool:
    """True when the image's relative path, or that path without its suffix, is listed."""
    return relative in noise or os.path.splitext(relative)[0] in noise


def decode(path: Path, size: int = 112) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        if image.size != (size, size):
            raise ValueError(f"{path} is {image.size[0]}x{image.size[1]}; expected an aligned {size}x{size} crop")
        return np.asarray(image, dtype=np.uint8)


class ImageList(Sequence):
    """Sliceable, lazily decoded uint8 [n, 112, 112, 3] images (what `embed_images` takes)."""

    def __init__(self, paths: Sequence[Path], size: int = 112) -> None:
        self.paths = list(paths)
        self.size = size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index):
        if isinstance(index, slice):
            chosen = self.paths[index]
            if not chosen:
                return np.zeros((0, self.size, self.size, 3), np.uint8)
            return np.stack([decode(p, self.size) for p in chosen])
        return decode(self.paths[index], self.size)
