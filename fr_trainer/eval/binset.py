"""LFW-style `.bin` verification sets: load, decode, write.

A `.bin` is `pickle.dump((bins, issame_list))` with `bins` holding 2N encoded images
(JPEG/PNG bytes, or 1-D uint8 arrays of those bytes) and `issame_list` N bools; pair i
is `bins[2i], bins[2i+1]`. Files written under Python 2 hold `str` objects, which
`pickle.load(..., encoding="bytes")` turns into `bytes`.

A pickle can run any code when it is loaded, so `.bin` files are read by `SafeUnpickler`:
it builds only what the format holds (lists, tuples, bytes, str, bools, numbers and numpy
arrays/scalars/dtypes) and refuses every other global (e.g. `os.system`) before calling
anything, with a `ValueError` naming the file.
"""

from __future__ import annotations

import importlib
import io
import os
import pickle
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SIZE = 112

# (module, name) a .bin may reference: numpy arrays (protocols 2-5), scalars and dtypes, and the
# `_codecs.encode` Python 3 uses for bytes at protocol 2. numpy 2 spells numpy.core numpy._core.
SAFE_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    }
)


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle asked for a global that a verification `.bin` never holds."""


def _canonical(module: str) -> str:
    return "numpy.core" + module[len("numpy._core") :] if module.startswith("numpy._core") else module


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that resolves only `SAFE_GLOBALS`; anything else raises `UnsafePickleError`."""

    def find_class(self, module: str, name: str):  # noqa: ANN201 - a callable or a class
        if (_canonical(module), name) not in SAFE_GLOBALS:
            raise UnsafePickleError(f"it asks for {module}.{name}")
        if module.startswith("numpy.core") or module.startswith("numpy._core"):
            rest = _canonical(module)[len("numpy.core") :]
            for spelling in ("numpy._core" + rest, "numpy.core" + rest):
                try:
                    return getattr(importlib.import_module(spelling), name)
                except (ImportError, AttributeError):
                    continue
        return super().find_class(module, name)


def safe_load(handle, encoding: str = "bytes"):  # noqa: ANN001, ANN201 - a file, any object
    """`pickle.load` restricted to what a `.bin` holds (see `SafeUnpickler`)."""
    return SafeUnpickler(handle, encoding=encoding).load()


@dataclass
class BinSet:
    """A decoded verification set.

    images: uint8 [2N, H, W, 3] RGB; pair i is images[2i], images[2i+1].
    issame: bool [N].
    """

    name: str
    images: np.ndarray
    issame: np.ndarray

    @property
    def num_pairs(self) -> int:
        return int(self.issame.size)


def _to_bytes(item: object) -> bytes | np.ndarray:
    """An entry of `bins` as encoded bytes, or as a decoded [H,W,3] uint8 array."""
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)
    if isinstance(item, str):  # a Python-2 str unpickled with a text encoding
        return item.encode("latin-1")
    if isinstance(item, np.ndarray):
        if item.ndim == 1 and item.dtype == np.uint8:
            return item.tobytes()
        if item.ndim == 3 and item.shape[-1] == 3 and item.dtype == np.uint8:
            return item
    # mxnet NDArray or anything with asnumpy()
    if hasattr(item, "asnumpy"):
        return _to_bytes(item.asnumpy())
    raise TypeError(
        f"expected encoded image bytes or a uint8 array, got {type(item).__name__}"
        + (f" with shape {item.shape} dtype {item.dtype}" if isinstance(item, np.ndarray) else "")
    )


def decode_image(data: bytes | np.ndarray, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """Decode one image to uint8 [image_size, image_size, 3] RGB (resized if needed)."""
    if isinstance(data, np.ndarray):
        image = Image.fromarray(data)
    else:
        image = Image.open(io.BytesIO(data))
    image = image.convert("RGB")
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def read_bin_pickle(path: str | os.PathLike) -> tuple[list, np.ndarray]:
    """Unpickle a `.bin` and check its structure; images stay encoded.

    Returns:
        (bins [2N] of encoded entries, issame bool [N]).
    Raises:
        FileNotFoundError, ValueError naming the file and what was expected.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"verification set {path} does not exist")
    with open(path, "rb") as f:
        try:
            obj = safe_load(f, encoding="bytes")
        except UnsafePickleError as error:
            raise ValueError(
                f"{path}: refused to load: {error}, which a verification .bin (a pickled "
                "(list of image bytes, issame list)) never holds; nothing in it was run. The file "
                "is not a .bin set or was crafted to run code: do not use it"
            ) from None
        except Exception as error:
            raise ValueError(
                f"{path}: not a readable .bin pickle ({type(error).__name__}: {error}); "
                "expected pickle.dump((bins, issame_list))"
            ) from error
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
        raise ValueError(
            f"{path}: expected a pickled pair (bins, issame_list), got {type(obj).__name__}"
            + (f" of length {len(obj)}" if isinstance(obj, (tuple, list)) else "")
        )
    bins, issame = obj
    bins = list(bins)
    issame = np.asarray(list(issame), dtype=bool).reshape(-1)
    if len(bins) != 2 * issame.size:
        raise ValueError(
            f"{path}: holds {len(bins)} images and {issame.size} pair labels; "
            f"expected 2 images per pair ({2 * issame.size} images), so the file is "
            "truncated or not a verification .bin"
        )
    return bins, issame


def load_bin(
    path: str | os.PathLike,
    image_size: int = IMAGE_SIZE,
    num_workers: int = 4,
    progress: bool = False,
) -> BinSet:
    """Load and decode a `.bin` verification set.

    Returns:
        BinSet with images uint8 [2N, image_size, image_size, 3] RGB and issame bool [N].
    """
    path = Path(path)
    bins, issame = read_bin_pickle(path)
    images = np.empty((len(bins), image_size, image_size, 3), dtype=np.uint8)

    def decode(i: int) -> None:
        try:
            images[i] = decode_image(_to_bytes(bins[i]), image_size)
        except Exception as error:
            raise ValueError(f"{path}: image {i} could not be decoded: {error}") from error

    indices = range(len(bins))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(bins), desc=f"decode {path.name}", unit="img", leave=False)
    with ThreadPoolExecutor(max(1, num_workers)) as pool:
        for _ in pool.map(decode, indices):
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return BinSet(name=path.stem, images=images, issame=issame)


def encode_image(image: np.ndarray, fmt: str = "JPEG", quality: int = 95) -> bytes:
    """uint8 [H, W, 3] RGB -> encoded bytes (JPEG or PNG)."""
    buffer = io.BytesIO()
    kwargs = {"quality": quality} if fmt.upper() in ("JPEG", "JPG") else {}
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def write_bin(
    path: str | os.PathLike,
    images: np.ndarray | Sequence[np.ndarray],
    issame: Sequence[bool] | np.ndarray,
    encoding: str = "bytes",
    fmt: str = "JPEG",
) -> Path:
    """Write a `.bin` from decoded images.

    Args:
        images: [2N, H, W, 3] uint8 RGB; pair i is images[2i], images[2i+1].
        issame: [N] bool.
        encoding: "bytes" (each image as encoded bytes) or "array" (each image as a
            1-D uint8 array of its encoded bytes).
        fmt: "JPEG" or "PNG" (PNG is lossless).
    """
    issame = [bool(x) for x in np.asarray(issame).reshape(-1)]
    if len(images) != 2 * len(issame):
        raise ValueError(f"need 2 images per pair: {len(images)} images for {len(issame)} pairs")
    if encoding not in ("bytes", "array"):
        raise ValueError(f"encoding must be 'bytes' or 'array', got {encoding!r}")
    bins: list = []
    for image in images:
        data = encode_image(image, fmt)
        bins.append(data if encoding == "bytes" else np.frombuffer(data, dtype=np.uint8))
    path = Path(path)
    with open(path, "wb") as f:
        pickle.dump((bins, issame), f, protocol=pickle.HIGHEST_PROTOCOL)
    return path
