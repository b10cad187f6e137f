"""Synthetic evaluation data for tests and benchmarks: a mini IJB tree, `.bin` sets, and
a tiny model whose embedding is a known function of the identity.

Identity k is drawn as a uniform gray image of level `gray_level(k)`; `GrayCodeNet`
maps the mean pixel of a normalised image to a one-hot-like code of that level, so its
embeddings of two images of one identity coincide and those of two identities are
orthogonal (cosine 0, squared L2 distance 2 after normalisation).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from fr_trainer.eval.align import TEMPLATE_112, apply_transform, warp_affine

MAX_GRAY_IDENTITIES = 12


def gray_level(identity: int) -> int:
    """The uint8 gray level of identity k in [0, 12)."""
    if not 0 <= identity < MAX_GRAY_IDENTITIES:
        raise ValueError(f"identity must be in [0, {MAX_GRAY_IDENTITIES}), got {identity}")
    return 10 + 20 * identity


def gray_image(identity: int, size: int = 112) -> np.ndarray:
    """uint8 [size, size, 3], every pixel gray_level(identity)."""
    return np.full((size, size, 3), gray_level(identity), dtype=np.uint8)


def gray_code_net(num_identities: int = MAX_GRAY_IDENTITIES, sharpness: float = 8.0):
    """torch module [N,3,H,W] (normalised) -> [N, num_identities]:
    `relu(1 - sharpness * |mean(x) - c_k|)` with c_k the normalised level of identity k."""
    import torch
    from torch import nn

    class GrayCodeNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            levels = [(gray_level(k) / 255.0 - 0.5) / 0.5 for k in range(num_identities)]
            self.register_buffer("centres", torch.tensor(levels, dtype=torch.float32))
            self.sharpness = sharpness

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            s = x.mean(dim=(1, 2, 3)).unsqueeze(1)
            return torch.relu(1.0 - self.sharpness * (s - self.centres).abs())

    return GrayCodeNet().eval()


def export_onnx_simple(module, path: str | os.PathLike, size: int = 112, opset: int = 17) -> Path:
    """Export a module [N,3,size,size] -> [N,D] with a dynamic batch (TorchScript exporter)."""
    import torch

    path = Path(path)
    example = torch.zeros(2, 3, size, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter is meant
        _export(module, example, path, opset)
    return path


def _export(module, example, path: Path, opset: int) -> None:
    import torch

    torch.onnx.export(
        module.eval(),
        (example,),
        str(path),
        input_names=["input"],
        output_names=["embedding"],
        dynamic_axes={"input": {0: "batch"}, "embedding": {0: "batch"}},
        opset_version=opset,
        dynamo=False,
    )


# ----------------------------------------------------------------------------- IJB tree


@dataclass
class IJBImage:
    """One row of the IJB meta files: loose crop, its 5 points, detection score."""

    name: str
    template_id: int
    media_id: int
    image: np.ndarray  # uint8 [H, W, 3]
    landmarks: np.ndarray  # [5, 2]
    det_score: float


def loose_crop_from_aligned(
    aligned: np.ndarray, rng: np.random.Generator, size: int = 160, max_angle_deg: float = 15.0
) -> tuple[np.ndarray, np.ndarray]:
    """Place an aligned 112x112 face into a size x size loose crop by a random similarity.

    Returns:
        (loose crop uint8 [size, size, 3], its landmarks [5, 2]).
    """
    angle = np.deg2rad(rng.uniform(-max_angle_deg, max_angle_deg))
    scale = rng.uniform(1.0, 1.2)
    rotation = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    centre = np.array([56.0, 56.0])
    shift = rng.uniform(-4, 4, size=2)
    to_loose = np.empty((2, 3))
    to_loose[:, :2] = rotation
    to_loose[:, 2] = size / 2 + shift - rotation @ centre
    loose = warp_affine(aligned, to_loose, size)
    return loose, apply_transform(to_loose, TEMPLATE_112)


def write_ijb_tree(
    root: str | os.PathLike,
    images: Sequence[IJBImage],
    pairs: Sequence[tuple[int, int, int]],
    galleries: dict[str, dict[int, int]] | None = None,
    probes: dict[int, int] | None = None,
    target: str = "IJBC",
) -> Path:
    """Write ROOT/meta/* and ROOT/loose_crop/* in the IJB layout.

    Args:
        pairs: (tid1, tid2, label) rows.
        galleries: {"G1": {template_id: subject_id}, ...}; probes: {template_id: subject_id}.
    """
    prefix = target.lower()
    root = Path(root)
    (root / "meta").mkdir(parents=True, exist_ok=True)
    (root / "loose_crop").mkdir(parents=True, exist_ok=True)
    with (
        open(root / "meta" / f"{prefix}_face_tid_mid.txt", "w") as tid,
        open(root / "meta" / f"{prefix}_name_5pts_score.txt", "w") as lmk,
    ):
        for item in images:
            Image.fromarray(item.image).save(root / "loose_crop" / item.name)
            tid.write(f"{item.name} {item.template_id} {item.media_id}\n")
            points = " ".join(f"{v:.4f}" for v in np.asarray(item.landmarks).reshape(-1))
            lmk.write(f"{item.name} {points} {item.det_score:.6f}\n")
    with open(root / "meta" / f"{prefix}_template_pair_label.txt", "w") as f:
        f.writelines(f"{t1} {t2} {label}\n" for t1, t2, label in pairs)
    files_of: dict[int, list[str]] = {}
    for item in images:
        files_of.setdefault(item.template_id, []).append(item.name)

    def write_csv(path: Path, members: dict[int, int]) -> None:
        with open(path, "w") as f:
            f.write("TEMPLATE_ID,SUBJECT_ID,FILENAME\n")
            for template, subject in members.items():
                for name in files_of.get(template, []):
                    f.write(f"{template},{subject},img/{name}\n")

    for name, members in (galleries or {}).items():
        write_csv(root / "meta" / f"{prefix}_1N_gallery_{name}.csv", members)
    if probes is not None:
        write_csv(root / "meta" / f"{prefix}_1N_probe_mixed.csv", probes)
    return root


def make_mini_ijb(
    root: str | os.PathLike,
    num_subjects: int = 20,
    templates_per_subject: int = 3,
    medias_per_template: int = 2,
    images_per_media: int = 2,
    impostors_per_genuine: int = 10,
    face: Callable[[int, np.random.Generator], np.ndarray] | None = None,
    image_format: str = "jpg",
    seed: int = 0,
    target: str = "IJBC",
) -> dict:
    """A complete mini IJB tree (1:1 and 1:N files).

    Args:
        face: (subject, rng) -> aligned uint8 [112, 112, 3]; default: a random texture
            per subject plus per-image noise.
    Returns:
        {"root", "num_images", "num_templates", "num_pairs", "subject_of" {tid: sid}}.
    Galleries: G1 holds the first template of the even subjects, G2 of the odd ones;
    probes are all other templates, so each gallery has mated and non-mated probes.
    """
    rng = np.random.default_rng(seed)
    bases = {}

    def default_face(subject: int, r: np.random.Generator) -> np.ndarray:
        if subject not in bases:
            low = r.integers(0, 256, size=(14, 14, 3), dtype=np.uint8)
            bases[subject] = np.asarray(Image.fromarray(low).resize((112, 112), Image.BILINEAR))
        noise = r.integers(-12, 13, size=(112, 112, 3))
        return np.clip(bases[subject].astype(np.int16) + noise, 0, 255).astype(np.uint8)

    face = face or default_face
    images: list[IJBImage] = []
    subject_of: dict[int, int] = {}
    templates_of: dict[int, list[int]] = {}
    tid, mid, index = 0, 0, 0
    for subject in range(num_subjects):
        for _ in range(templates_per_subject):
            tid += 1
            subject_of[tid] = subject
            templates_of.setdefault(subject, []).append(tid)
            for _ in range(medias_per_template):
                mid += 1
                for _ in range(images_per_media):
                    index += 1
                    loose, points = loose_crop_from_aligned(face(subject, rng), rng)
                    images.append(
                        IJBImage(
                            f"{index}.{image_format}",
                            tid,
                            mid,
                            loose,
                            points,
                            float(rng.uniform(0.5, 1.0)),
                        )
                    )
    pairs = []
    for tids in templates_of.values():
        pairs += [(a, b, 1) for i, a in enumerate(tids) for b in tids[i + 1 :]]
    all_tids = np.array(sorted(subject_of))
    impostors = 0
    wanted = impostors_per_genuine * len(pairs)
    while impostors < wanted:
        a, b = rng.choice(all_tids, size=2, replace=False)
        if subject_of[int(a)] != subject_of[int(b)]:
            pairs.append((int(a), int(b), 0))
            impostors += 1
    galleries = {"G1": {}, "G2": {}}
    probes = {}
    for subject, tids in templates_of.items():
        galleries["G1" if subject % 2 == 0 else "G2"][tids[0]] = subject
        for t in tids[1:]:
            probes[t] = subject
    write_ijb_tree(root, images, pairs, galleries, probes, target)
    return {
        "root": str(root),
        "num_images": len(images),
        "num_templates": tid,
        "num_pairs": len(pairs),
        "subject_of": subject_of,
    }
