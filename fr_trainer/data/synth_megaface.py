"""A mini MegaFace tree of synthetic faces (written by `fr-trainer synth`).

    OUT/MegaFace/
      facescrub/<identity>/<k>.jpg    probe identities (FaceScrub's role): aligned 112x112,
                                      `images_per_identity` each
      megaface/<group>/<j>.jpg        distractors (MegaFace's role): one identity each, in
                                      groups of 1000 like MegaFace's nested folders
      noise.txt                       a noise list: relative paths (under facescrub/ or
                                      megaface/) to ignore; here one distractor that is a
                                      copy of a probe identity's face, as in the real list
      summary.json                    counts and seed

Identities are drawn from numbers disjoint from the training, held-out and IJB-C ones.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from fr_trainer.data import faces
from fr_trainer.data.synthetic import _rng, identity_params

_MEGAFACE_IMAGE = 40  # stream kind, distinct from fr_trainer.data.synthetic's
PROBE_IDENTITY_BASE = 50_000_000
DISTRACTOR_IDENTITY_BASE = 60_000_000


def _face(seed: int, identity: int, sample: int) -> bytes:
    rng = _rng(seed, _MEGAFACE_IMAGE, identity, sample)
    nuisance = faces.sample_nuisance(rng, 1.0)
    jpeg, _ = faces.render_jpeg(identity_params(seed, identity), nuisance, faces.jitter_transform(rng), rng)
    return jpeg


def write_megaface_tree(
    out_dir: str | Path,
    num_identities: int = 10,
    images_per_identity: int = 5,
    num_distractors: int = 500,
    seed: int = 0,
) -> Path:
    """Write the tree under `out_dir/MegaFace` and return that directory."""
    if num_identities < 1 or images_per_identity < 2 or num_distractors < 1:
        raise ValueError(
            f"a MegaFace tree needs >= 1 identity with >= 2 images and >= 1 distractor; got "
            f"{num_identities} identities x {images_per_identity} images, {num_distractors} distractors"
        )
    start = time.perf_counter()
    root = Path(out_dir) / "MegaFace"
    for k in range(num_identities):
        folder = root / "facescrub" / f"id{k:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        for s in range(images_per_identity):
            (folder / f"{s}.jpg").write_bytes(_face(seed, PROBE_IDENTITY_BASE + k, s))
    for j in range(num_distractors):
        folder = root / "megaface" / f"{j // 1000:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{j}.jpg").write_bytes(_face(seed, DISTRACTOR_IDENTITY_BASE + j, 0))
    # the noise: the last distractor is re-rendered as probe identity 0 (a "duplicate")
    noisy = f"{(num_distractors - 1) // 1000:04d}/{num_distractors - 1}.jpg"
    (root / "megaface" / noisy).write_bytes(_face(seed, PROBE_IDENTITY_BASE, 999))
    (root / "noise.txt").write_text(f"# images to ignore (relative to facescrub/ or megaface/)\n{noisy}\n")
    summary = {
        "identities": num_identities,
        "images_per_identity": images_per_identity,
        "distractors": num_distractors,
        "noise": [noisy],
        "seed": seed,
        "seconds": time.perf_counter() - start,
    }
    (root / "summary.json").write_text(json.dumps(summary, indent=2))
    return root
