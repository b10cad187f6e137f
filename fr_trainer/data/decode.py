"""Image decode and normalisation: Pillow on CPU, torchvision's nvJPEG on GPU when present.

Training images are normalised to `(x / 255 - 0.5) / 0.5`, i.e. `x / 127.5 - 1`, in [-1, 1].
"""

from __future__ import annotations

import io
import re

import numpy as np
import torch
from PIL import Image


def decode_rgb(data: bytes, size: int | None = None) -> np.ndarray:
    """JPEG/PNG bytes -> uint8 [H,W,3] RGB; resized (bilinear) to `size` x `size` if given.

    Raises the decoder's error (OSError/ValueError...) on bytes that do not decode.
    """
    with Image.open(io.BytesIO(data)) as image:
        if size is not None and image.format == "JPEG":
            image.draft("RGB", (size, size))  # DCT-domain downscale of large JPEGs
        image = image.convert("RGB")
        if size is not None and image.size != (size, size):
            image = image.resize((size, size), Image.BILINEAR)
        return np.asarray(image)


def jpeg_problem(data: bytes) -> str | None:
    """Why GPU (nvJPEG) decode cannot take `data`, from its header only (cheap), or None."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            kind = image.format
    except Exception as error:  # noqa: BLE001 - any parser failure is the image's problem
        return f"image of {len(data)} bytes does not decode ({type(error).__name__}: {decoder_text(error)})"
    if kind != "JPEG":
        return f"image is {kind}, but GPU decode (data.decode=gpu) takes only JPEG; use data.decode=pil"
    return None


def undecodable(datas: list[torch.Tensor]) -> list[tuple[int, str]]:
    """`(position, reason)` of the encoded images (uint8 1-D tensors) Pillow cannot decode."""
    bad = []
    for position, data in enumerate(datas):
        raw = data.cpu().numpy().tobytes()
        try:
            decode_rgb(raw)
        except Exception as error:  # noqa: BLE001 - any decoder failure is the image's problem
            bad.append((position, f"image of {len(raw)} bytes does not decode ({type(error).__name__}: "
                                  f"{decoder_text(error)})"))
    return bad


def decoder_text(error: Exception) -> str:
    """A decoder error's message without the object address Pillow puts in it."""
    return re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(error)) or "no message"


def to_chw_uint8(pixels: np.ndarray, flip: bool) -> torch.Tensor:
    """uint8 [H,W,3] -> uint8 [3,H,W] (horizontally flipped if `flip`)."""
    if flip:
        pixels = pixels[:, ::-1]
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> float32 `(x/255 - 0.5)/0.5` in [-1, 1]."""
    return images.float().div_(127.5).sub_(1.0)


def gpu_decode_available() -> bool:
    """True when torchvision (the `vision` extra) and a CUDA device are present."""
    if not torch.cuda.is_available():
        return False
    try:
        import torchvision.io  # noqa: F401
    except Exception:  # noqa: BLE001 - a CPU-only torch makes torchvision fail at import
        return False
    return True


def decode_jpeg_batch_gpu(
    datas: list[torch.Tensor], device: torch.device, size: int
) -> torch.Tensor:
    """Encoded images (uint8 1-D tensors) -> uint8 [B,3,size,size] on `device` (nvJPEG).

    Needs the `vision` extra (torchvision with CUDA). Images of another size are resized.
    """
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError as error:
        raise ImportError(
            "GPU JPEG decode needs torchvision: pip install 'fr_trainer[vision]' "
            "(with a CUDA build of torch), or use decode='pil'"
        ) from error
    # torchvision takes the outputs from the current stream's pool but decodes on a stream
    # of its own without waiting for the current one: blocks freed there with kernels still
    # queued (the previous batch's stack and flip) could be written before those kernels
    # run (pytorch/vision#9606). Wait for this stream's own queued work first.
    torch.cuda.current_stream(device).synchronize()
    images = decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)
    out = []
    for image in images:
        if image.shape[-2:] != (size, size):
            image = (
                torch.nn.functional.interpolate(
                    image[None].float(), size=(size, size), mode="bilinear", align_corners=False
                )[0]
                .round()
                .clamp(0, 255)
                .to(torch.uint8)
            )
        out.append(image)
    return torch.stack(out)
