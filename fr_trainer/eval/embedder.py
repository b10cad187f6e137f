"""Embedders: anything that maps a normalised NCHW float32 batch to [N, D] features.

- `Embedder`: the protocol, `embedder(batch [N,3,112,112] float32) -> [N, D] float32`,
  where `batch = (uint8 / 255 - 0.5) / 0.5` in RGB order.
- `OnnxEmbedder(path)`: onnxruntime (CUDA provider when present, CPU otherwise).
- `TorchEmbedder(module)`: a backbone `nn.Module` (eval mode, no grad).
- `embed_images(embedder, images_uint8, batch_size, flip=True)`: batched embedding of
  uint8 NHWC images; with `flip`, the feature is `emb(x) + emb(flip(x))`.
- `load_embedder(path)`: `.onnx` files now; anything else goes to
  `fr_trainer.train.checkpoint.load_backbone(path)` (the seam to the trainer).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

INPUT_SIZE = 112


@runtime_checkable
class Embedder(Protocol):
    """Callable on float32 [N, 3, 112, 112] normalised RGB batches -> float32 [N, D]."""

    def __call__(self, batch: np.ndarray) -> np.ndarray: ...


def normalize_images(images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, 3] RGB -> float32 [N, 3, H, W] in [-1, 1], `(x/255 - 0.5)/0.5`."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images [N, H, W, 3], got shape {images.shape}")
    batch = images.transpose(0, 3, 1, 2).astype(np.float32)
    batch *= 1.0 / 127.5
    batch -= 1.0
    return batch


def _dim_ok(dim: object, expected: int) -> bool:
    """An ONNX dim matches when it is the expected int or symbolic/unknown."""
    return not isinstance(dim, int) or dim == expected or dim <= 0


class OnnxEmbedder:
    """Run an ONNX face model with onnxruntime.

    Args:
        path: the .onnx file: one input [N, 3, 112, 112] float (N dynamic or fixed),
            first output [N, D].
        providers: onnxruntime execution providers; default CUDA when available, then CPU.
        batch_size: the largest batch sent to the session in one run.
        num_threads: intra-op threads for the CPU provider (0 = onnxruntime's default).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        providers: Sequence[str] | None = None,
        batch_size: int = 256,
        num_threads: int = 0,
    ) -> None:
        try:
            import onnxruntime as ort
        except ImportError as error:
            raise ImportError(
                "OnnxEmbedder needs onnxruntime: pip install fr_trainer[onnx]"
            ) from error
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX model {self.path} does not exist")
        if providers is None:
            available = ort.get_available_providers()
            providers = [
                p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available
            ]
        options = ort.SessionOptions()
        if num_threads:
            options.intra_op_num_threads = int(num_threads)
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=list(providers))
        except Exception as error:
            raise ValueError(f"{self.path}: onnxruntime cannot load this model: {error}") from error
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ValueError(
                f"{self.path}: the model has {len(inputs)} inputs "
                f"({[i.name for i in inputs]}); expected one input [N,3,112,112]"
            )
        shape = list(inputs[0].shape)
        if len(shape) != 4 or not all(
            _dim_ok(d, e) for d, e in zip(shape[1:], (3, INPUT_SIZE, INPUT_SIZE))
        ):
            raise ValueError(
                f"{self.path}: input {inputs[0].name!r} has shape {shape}; expected "
                f"[N,3,{INPUT_SIZE},{INPUT_SIZE}] (NCHW RGB, normalised (x/255-0.5)/0.5); "
                "re-export the model with that input"
            )
        if "float" not in inputs[0].type or "16" in inputs[0].type:
            raise ValueError(
                f"{self.path}: input type is {inputs[0].type}; expected tensor(float) (fp32)"
            )
        self.input_name = inputs[0].name
        self.output_name = self.session.get_outputs()[0].name
        fixed_batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
        self.fixed_batch = fixed_batch
        self.batch_size = fixed_batch or max(1, int(batch_size))
        self.providers = self.session.get_providers()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """float32 [N, 3, 112, 112] -> float32 [N, D]."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        outputs = []
        for start in range(0, batch.shape[0], self.batch_size):
            chunk = batch[start : start + self.batch_size]
            n = chunk.shape[0]
            if self.fixed_batch and n < self.fixed_batch:  # pad the last chunk
                pad = np.zeros((self.fixed_batch - n, *chunk.shape[1:]), dtype=np.float32)
                chunk = np.concatenate([chunk, pad])
            out = self.session.run([self.output_name], {self.input_name: chunk})[0]
            check_embedding_shape(out, chunk.shape[0], str(self.path))
            outputs.append(np.asarray(out, dtype=np.float32).reshape(out.shape[0], -1)[:n])
        return np.concatenate(outputs) if outputs else np.zeros((0, 0), np.float32)


class TorchEmbedder:
    """Wrap a backbone `nn.Module` (forward: [N,3,112,112] -> [N,D]) as an Embedder."""

    def __init__(self, module, device: str | None = None, batch_size: int = 256) -> None:
        import torch

        self.torch = torch
        if device is None:
            try:
                device = str(next(module.parameters()).device)
            except StopIteration:
                device = "cpu"
        try:
            self.device = torch.device(device)
        except RuntimeError:
            raise ValueError(f"device {device!r} is not a torch device; use cpu, cuda or cuda:N") from None
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: CUDA is not available here; use --device cpu")
        self.module = module.to(self.device).eval()
        self.batch_size = max(1, int(batch_size))

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        torch = self.torch
        outputs = []
        with torch.inference_mode():
            for start in range(0, batch.shape[0], self.batch_size):
                chunk = torch.from_numpy(
                    np.ascontiguousarray(batch[start : start + self.batch_size], dtype=np.float32)
                ).to(self.device)
                out = self.module(chunk)
                if isinstance(out, (tuple, list)):
                    out = out[0]
                check_embedding_shape(out, chunk.shape[0], type(self.module).__name__)
                outputs.append(out.float().reshape(out.shape[0], -1).cpu().numpy())
        return np.concatenate(outputs) if outputs else np.zeros((0, 0), np.float32)


def iter_batches(n: int, batch_size: int) -> Iterator[slice]:
    """Slices [0:b], [b:2b], ... covering range(n)."""
    for start in range(0, n, batch_size):
        yield slice(start, min(n, start + batch_size))


def embed_batch(
    embedder: Callable[[np.ndarray], np.ndarray], images: np.ndarray, flip: bool = True
) -> np.ndarray:
    """uint8 [B, H, W, 3] -> float32 [B, D]; with flip, emb(x) + emb(x flipped left-right)."""
    batch = normalize_images(images)
    if not flip:
        return np.asarray(embedder(batch), dtype=np.float32)
    both = np.concatenate([batch, batch[..., ::-1]])
    features = np.asarray(embedder(both), dtype=np.float32)
    n = batch.shape[0]
    return features[:n] + features[n:]


def embed_images(
    embedder: Callable[[np.ndarray], np.ndarray],
    images: np.ndarray,
    batch_size: int = 128,
    flip: bool = True,
    progress: bool | str = False,
) -> np.ndarray:
    """Embed uint8 RGB images in batches.

    Args:
        embedder: an Embedder.
        images: uint8 [N, H, W, 3] (an array or anything sliceable with a length).
        batch_size: images per call (the embedder sees 2x with flip).
        flip: add the embedding of the horizontally flipped image.
        progress: show a tqdm bar (a str is used as its description).
    Returns:
        float32 [N, D], not normalised.
    """
    n = len(images)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, unit="img", desc=progress if isinstance(progress, str) else "embed")
    chunks = []
    for part in iter_batches(n, batch_size):
        chunks.append(embed_batch(embedder, np.asarray(images[part]), flip))
        if bar is not None:
            bar.update(part.stop - part.start)
    if bar is not None:
        bar.close()
    if not chunks:
        return np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(chunks)


def shard_slice(n: int, rank: int, world_size: int) -> slice:
    """The contiguous block of range(n) that `rank` of `world_size` embeds.

    The first `n % world_size` ranks take one item more (the rule of ClassShard);
    concatenating the blocks of ranks 0..world_size-1 gives range(n) in order.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, {world_size})")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def load_embedder(
    path: str | os.PathLike,
    providers: Sequence[str] | None = None,
    batch_size: int = 256,
    num_threads: int = 0,
    device: str | None = None,
    ema: bool = False,
) -> Callable[[np.ndarray], np.ndarray]:
    """An Embedder for a model file: `.onnx` -> OnnxEmbedder, otherwise a checkpoint
    (`ema=True`: the moving average of its weights).

    Checkpoints go through `fr_trainer.train.checkpoint.load_backbone(path)`, which
    must return the backbone `nn.Module`; it lives with the trainer.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"model {path} does not exist (expected an .onnx file or a checkpoint)"
        )
    if path.suffix.lower() == ".onnx":
        if ema:
            raise ValueError(f"--ema needs a training checkpoint, not the ONNX file {path}")
        return OnnxEmbedder(
            path, providers=providers, batch_size=batch_size, num_threads=num_threads
        )
    # --- seam: training checkpoints are read by the trainer's checkpoint module ---
    try:
        from fr_trainer.train.checkpoint import load_backbone
    except ImportError as error:
        raise NotImplementedError(
            f"{path}: not an .onnx file, and loading training checkpoints needs "
            "fr_trainer.train.checkpoint.load_backbone, which is not available "
            f"({error}); export the checkpoint with `fr-trainer export {path} model.onnx` "
            "and pass the .onnx file"
        ) from error
    from fr_trainer.train.load_errors import UNREADABLE, unreadable_message

    try:
        module = load_backbone(path, ema=True) if ema else load_backbone(path)
    except UNREADABLE as error:
        raise ValueError(unreadable_message(path, error)) from None
    return TorchEmbedder(module, device=device, batch_size=batch_size)


MIN_EMBEDDING_SIZE = 32  # below this a face embedding is suspicious (`embedding_size` warns)


def embedding_size(embedder: Callable[[np.ndarray], np.ndarray], name: str = "the model") -> int:
    """D of the embedder's output, from one blank image; ValueError unless it is [N, D]."""
    try:
        out = np.asarray(embedder(np.zeros((2, 3, INPUT_SIZE, INPUT_SIZE), np.float32)))
        check_embedding_shape(out, 2, "it")
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from None
    return int(out.shape[1])


def check_embedding_shape(out, batch: int, name: str = "the model") -> None:
    """Raise ValueError unless `out` (a numpy array or tensor) is [batch, D]: a 1-D output
    [N] would otherwise pass as N one-dimensional embeddings."""
    shape = tuple(out.shape)
    if len(shape) < 2 or shape[0] != batch:
        raise ValueError(
            f"{name} returned an output of shape {list(shape)} for {batch} images; expected "
            f"embeddings [{batch}, D] (one row of D features per image); is it a face-embedding model?"
        )
