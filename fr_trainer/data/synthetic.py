"""Synthetic face identities written in the real formats (`fr-trainer synth OUT_DIR`).

`generate(out_dir, ...)` renders parametric faces (`fr_trainer.data.faces`) and writes::

    OUT_DIR/
      train.rec, train.idx    insightface layout: record 0 header (flag 2, label [N+1, N+1+C]),
                              image records 1..N (scalar label = class, id = key), then one
                              identity record per class (label [first, end), empty payload).
                              Classes 0..C-1 in order, images of a class contiguous.
      property                "C,112,112" (insightface's property file)
      <name>.bin              one per verification set (default synth_val.bin, synth_hard.bin):
                              pickle of (list of 2P JPEG bytes, list of P bool issame); pairs from
                              identities held out of training, half genuine, shuffled; hard =
                              larger pose and stronger degradations
      IJBC/                   mini IJB-C from other held-out identities (the `--root` for eval)
        loose_crop/<n>.jpg    n = 1, 2, ...: NOT aligned: the face is drawn through a random
                              similarity (scale 1.0-1.7, roll up to ~30 deg, shift) into a
                              150-230 px canvas; aligning the 5 points below to the 112x112
                              template of FORMATS.md recovers the face
        meta/ijbc_face_tid_mid.txt        "<n>.jpg template_id media_id", one row per image
        meta/ijbc_name_5pts_score.txt     "<n>.jpg x1 y1 ... x5 y5 det_score" (left eye, right eye,
                                          nose, left/right mouth corner), same row order
        meta/ijbc_template_pair_label.txt "tid1 tid2 label" (1 genuine, 0 impostor): every
                                          same-subject template pair + sampled impostors
        meta/ijbc_1N_gallery_G1.csv       header TEMPLATE_ID,SUBJECT_ID,FILENAME,SIGHTING_ID;
        meta/ijbc_1N_gallery_G2.csv       one row per image; FILENAME = the loose_crop name,
        meta/ijbc_1N_probe_mixed.csv      SIGHTING_ID = media id. Each subject's first template
                                          is its gallery template (even subjects in G1, odd in
                                          G2); its other templates are probes (mated in one
                                          gallery, non-mated in the other). 1:N templates are
                                          the 1:1 templates (same ids, same images).
      summary.json            counts, file names, seed, timing

Identity k (0-based) of training has class k. Every image has its own random stream keyed
by (seed, kind, identity, sample), so the bytes do not depend on the number of workers.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import multiprocessing as mp
import os
import pickle
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fr_trainer.data import faces
from fr_trainer.data.recordio import IRHeader, RecordWriter, pack

# Stream kinds (first words of every SeedSequence) so that streams never overlap.
_IDENTITY, _TRAIN, _PAIRS, _PAIR_IMAGE, _IJBC_PLAN, _IJBC_IMAGE = range(6)

DEFAULT_VAL_SETS: tuple[tuple[str, float], ...] = (("synth_val", 1.0), ("synth_hard", 1.6))


@dataclass
class SyntheticSummary:
    """What `generate` wrote (paths relative to `out_dir` in `files`)."""

    out_dir: str
    seed: int
    num_classes: int
    num_images: int
    image_size: int
    files: dict[str, str] = field(default_factory=dict)
    bins: dict[str, int] = field(default_factory=dict)  # name -> number of pairs
    ijbc_subjects: int = 0
    ijbc_templates: int = 0
    ijbc_images: int = 0
    ijbc_pairs: int = 0
    seconds: float = 0.0
    images_rendered: int = 0

    @property
    def images_per_second(self) -> float:
        return self.images_rendered / self.seconds if self.seconds else 0.0


def _rng(*words: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(w) for w in words]))


def identity_params(seed: int, identity: int) -> faces.Identity:
    """The fixed parameters of identity `identity` (train and held-out share one numbering)."""
    return faces.sample_identity(_rng(seed, _IDENTITY, identity))


# ---- worker tasks (module level: picklable) ---------------------------------------------


def _train_images(task: tuple[int, int, int, int]) -> list[bytes]:
    """JPEGs of training identity `identity`: task = (seed, identity, count, size)."""
    seed, identity, count, size = task
    person = identity_params(seed, identity)
    images = []
    for sample in range(count):
        rng = _rng(seed, _TRAIN, identity, sample)
        nuisance = faces.sample_nuisance(rng)
        transform = faces.jitter_transform(rng) if size == 112 else _scaled_jitter(rng, size)
        jpeg, _ = faces.render_jpeg(person, nuisance, transform, rng, (size, size))
        images.append(jpeg)
    return images


def _scaled_jitter(rng: np.random.Generator, size: int) -> np.ndarray:
    transform = faces.jitter_transform(rng)
    return transform * (size / 112.0)


def _pair_image(task: tuple[int, int, int, int, float]) -> bytes:
    """One verification image: task = (seed, set index, image index, identity, difficulty)."""
    seed, set_index, image_index, identity, difficulty = task
    rng = _rng(seed, _PAIR_IMAGE, set_index, image_index)
    nuisance = faces.sample_nuisance(rng, difficulty)
    jpeg, _ = faces.render_jpeg(
        identity_params(seed, identity), nuisance, faces.jitter_transform(rng), rng
    )
    return jpeg


def _ijbc_image(task: tuple[int, int, int, int]) -> tuple[bytes, np.ndarray, float]:
    """One loose crop: task = (seed, identity, media, frame) -> (JPEG, landmarks [5,2], score)."""
    seed, identity, media, frame = task
    media_rng = _rng(seed, _IJBC_IMAGE, identity, media)
    base = faces.sample_nuisance(media_rng, 1.2)
    rng = _rng(seed, _IJBC_IMAGE, identity, media, frame + 1)
    nuisance = dataclasses.replace(
        base,
        yaw=float(np.clip(base.yaw + rng.normal(0, 0.08), -0.9, 0.9)),
        pitch=float(base.pitch + rng.normal(0, 0.05)),
        smile=float(np.clip(base.smile + rng.normal(0, 0.2), -0.4, 1.0)),
        noise=float(base.noise * rng.uniform(0.7, 1.3)),
    )
    side = int(media_rng.integers(150, 231))
    scale = float(media_rng.uniform(1.0, 1.7))
    slack = max(side / 2 - 48 * scale, 0.0)
    transform = faces.similarity(
        scale=scale * float(rng.uniform(0.97, 1.03)),
        angle=float(np.clip(media_rng.normal(0, 0.22), -0.55, 0.55) + rng.normal(0, 0.03)),
        shift=(float(media_rng.uniform(-slack, slack)), float(media_rng.uniform(-slack, slack))),
        canvas_center=(side / 2, side / 2),
    )
    jpeg, landmarks = faces.render_jpeg(
        identity_params(seed, identity), nuisance, transform, rng, (side, side)
    )
    quality = 0.99 - 0.25 * abs(nuisance.yaw) - 0.08 * nuisance.blur - 0.01 * nuisance.noise
    score = float(np.clip(quality + rng.normal(0, 0.02), 0.3, 0.999))
    return jpeg, landmarks, score


# ---- parallel map -----------------------------------------------------------------------


def _map(fn: Callable, tasks: Sequence, workers: int, pool: mp.pool.Pool | None) -> Iterator:
    """Ordered map, in-process when there is no pool."""
    if pool is None:
        return map(fn, tasks)
    chunk = max(1, min(16, len(tasks) // (4 * max(workers, 1)) or 1))
    return pool.imap(fn, tasks, chunksize=chunk)


def _progress(iterable: Iterable, total: int, desc: str, show: bool) -> Iterable:
    if not show:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="it", leave=False)


# ---- writers ----------------------------------------------------------------------------


def _write_train(
    out: Path,
    seed: int,
    num_identities: int,
    per_identity: int,
    size: int,
    workers: int,
    pool,
    show: bool,
) -> int:
    num_images = num_identities * per_identity
    first_identity_key = num_images + 1
    tasks = [(seed, identity, per_identity, size) for identity in range(num_identities)]
    ranges = []
    with RecordWriter(out / "train.rec", out / "train.idx") as writer:
        writer.write(
            0, pack(IRHeader(0, [first_identity_key, first_identity_key + num_identities], 0, 0))
        )
        key = 1
        images = _progress(
            _map(_train_images, tasks, workers, pool), num_identities, "train identities", show
        )
        for identity, jpegs in enumerate(images):
            ranges.append((key, key + len(jpegs)))
            for jpeg in jpegs:
                writer.write(key, pack(IRHeader(0, float(identity), key, 0), jpeg))
                key += 1
        for identity, (first, end) in enumerate(ranges):
            writer.write(first_identity_key + identity, pack(IRHeader(0, [first, end], 0, 0)))
    (out / "property").write_text(f"{num_identities},{size},{size}\n")
    return num_images


def plan_pairs(
    seed: int, set_index: int, identities: np.ndarray, num_pairs: int
) -> list[tuple[int, int, bool]]:
    """(identity_a, identity_b, issame) per pair: half genuine, order shuffled."""
    rng = _rng(seed, _PAIRS, set_index)
    pairs = []
    for index in range(num_pairs):
        if index < (num_pairs + 1) // 2:
            person = int(rng.choice(identities))
            pairs.append((person, person, True))
        else:
            a, b = rng.choice(identities, size=2, replace=False)
            pairs.append((int(a), int(b), False))
    order = rng.permutation(num_pairs)
    return [pairs[i] for i in order]


def _write_bin(
    path: Path,
    seed: int,
    set_index: int,
    identities: np.ndarray,
    num_pairs: int,
    difficulty: float,
    workers: int,
    pool,
    show: bool,
) -> int:
    pairs = plan_pairs(seed, set_index, identities, num_pairs)
    tasks = []
    for index, (a, b, _) in enumerate(pairs):
        tasks.append((seed, set_index, 2 * index, a, difficulty))
        tasks.append((seed, set_index, 2 * index + 1, b, difficulty))
    images = list(_progress(_map(_pair_image, tasks, workers, pool), len(tasks), path.name, show))
    with open(path, "wb") as handle:
        pickle.dump((images, [same for _, _, same in pairs]), handle, protocol=4)
    return len(tasks)


@dataclass(frozen=True)
class _IjbcImage:
    name: str
    subject: int
    template: int
    media: int
    task: tuple[int, int, int, int]


def plan_ijbc(seed: int, identities: np.ndarray) -> list[_IjbcImage]:
    """Images of the mini IJB-C: per subject 3-6 media of 1-3 frames, split into 2-3 templates."""
    rng = _rng(seed, _IJBC_PLAN)
    rows: list[_IjbcImage] = []
    template_id, media_id, image_number = 0, 0, 0
    for subject_index, identity in enumerate(identities):
        num_media = int(rng.integers(3, 7))
        num_templates = int(rng.integers(2, 4))
        owner = np.concatenate(
            [np.arange(num_templates), rng.integers(0, num_templates, num_media - num_templates)]
        )
        owner = np.sort(owner)
        for media in range(num_media):
            media_id += 1
            for frame in range(int(rng.integers(1, 4))):
                image_number += 1
                rows.append(
                    _IjbcImage(
                        name=f"{image_number}.jpg",
                        subject=subject_index + 1,
                        template=template_id + 1 + int(owner[media]),
                        media=media_id,
                        task=(seed, int(identity), media, frame),
                    )
                )
        template_id += num_templates
    return rows


def _template_pairs(
    seed: int, rows: list[_IjbcImage], impostors_per_genuine: int
) -> list[tuple[int, int, int]]:
    subject_of: dict[int, int] = {}
    for row in rows:
        subject_of[row.template] = row.subject
    templates = sorted(subject_of)
    genuine = [
        (a, b, 1)
        for i, a in enumerate(templates)
        for b in templates[i + 1 :]
        if subject_of[a] == subject_of[b]
    ]
    rng = _rng(seed, _IJBC_PLAN, 1)
    wanted = impostors_per_genuine * len(genuine)
    impostor: set[tuple[int, int]] = set()
    candidates = [
        (a, b)
        for i, a in enumerate(templates)
        for b in templates[i + 1 :]
        if subject_of[a] != subject_of[b]
    ]
    if candidates:
        picks = rng.choice(len(candidates), size=min(wanted, len(candidates)), replace=False)
        impostor = {candidates[int(i)] for i in picks}
    return genuine + [(a, b, 0) for a, b in sorted(impostor)]


def _write_1n(meta: Path, rows: list[_IjbcImage]) -> None:
    first_template: dict[int, int] = {}
    for row in rows:
        first_template.setdefault(row.subject, row.template)
    files = {
        name: []
        for name in ("ijbc_1N_gallery_G1.csv", "ijbc_1N_gallery_G2.csv", "ijbc_1N_probe_mixed.csv")
    }
    for row in rows:
        if row.template == first_template[row.subject]:
            name = "ijbc_1N_gallery_G1.csv" if row.subject % 2 == 0 else "ijbc_1N_gallery_G2.csv"
        else:
            name = "ijbc_1N_probe_mixed.csv"
        files[name].append((row.template, row.subject, row.name, row.media))
    for name, lines in files.items():
        with open(meta / name, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["TEMPLATE_ID", "SUBJECT_ID", "FILENAME", "SIGHTING_ID"])
            writer.writerows(lines)


def _write_ijbc(
    root: Path,
    seed: int,
    identities: np.ndarray,
    impostors_per_genuine: int,
    workers: int,
    pool,
    show: bool,
) -> tuple[int, int, int]:
    crops, meta = root / "loose_crop", root / "meta"
    crops.mkdir(parents=True, exist_ok=True)
    meta.mkdir(parents=True, exist_ok=True)
    rows = plan_ijbc(seed, identities)
    results = _progress(
        _map(_ijbc_image, [row.task for row in rows], workers, pool), len(rows), "IJB-C", show
    )
    with (
        open(meta / "ijbc_face_tid_mid.txt", "w") as tid_mid,
        open(meta / "ijbc_name_5pts_score.txt", "w") as points,
    ):
        for row, (jpeg, landmarks, score) in zip(rows, results):
            (crops / row.name).write_bytes(jpeg)
            tid_mid.write(f"{row.name} {row.template} {row.media}\n")
            coords = " ".join(f"{value:.3f}" for value in landmarks.reshape(-1))
            points.write(f"{row.name} {coords} {score:.4f}\n")
    pairs = _template_pairs(seed, rows, impostors_per_genuine)
    with open(meta / "ijbc_template_pair_label.txt", "w") as handle:
        handle.writelines(f"{a} {b} {label}\n" for a, b, label in pairs)
    _write_1n(meta, rows)
    return len(rows), len({row.template for row in rows}), len(pairs)


def generate(
    out_dir: str | os.PathLike,
    *,
    num_identities: int = 300,
    images_per_identity: int = 20,
    num_holdout_identities: int = 100,
    num_pairs: int = 1000,
    val_sets: Sequence[tuple[str, float]] = DEFAULT_VAL_SETS,
    num_ijbc_subjects: int = 40,
    ijbc_impostors_per_genuine: int = 30,
    image_size: int = 112,
    seed: int = 0,
    workers: int | None = None,
    progress: bool = False,
) -> SyntheticSummary:
    """Render and write the synthetic set (layout in the module docstring).

    Training identities are 0..num_identities-1; the `.bin` pairs use the next
    `num_holdout_identities`, IJB-C the `num_ijbc_subjects` after those. `val_sets` lists
    (name, difficulty) per `.bin`; `workers` defaults to the CPU count (0 or 1: in-process).
    """
    _validate(
        num_identities,
        images_per_identity,
        num_holdout_identities,
        num_pairs,
        num_ijbc_subjects,
        image_size,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    workers = (os.cpu_count() or 1) if workers is None else int(workers)
    start = time.perf_counter()
    summary = SyntheticSummary(
        str(out), seed, num_identities, num_identities * images_per_identity, image_size
    )
    pool = _make_pool(workers)
    try:
        summary.images_rendered += _write_train(
            out, seed, num_identities, images_per_identity, image_size, workers, pool, progress
        )
        summary.files.update(rec="train.rec", idx="train.idx", property="property")
        holdout = np.arange(num_identities, num_identities + num_holdout_identities)
        for set_index, (name, difficulty) in enumerate(val_sets):
            if num_pairs and num_holdout_identities >= 2:
                summary.images_rendered += _write_bin(
                    out / f"{name}.bin",
                    seed,
                    set_index,
                    holdout,
                    num_pairs,
                    difficulty,
                    workers,
                    pool,
                    progress,
                )
                summary.bins[name] = num_pairs
                summary.files[name] = f"{name}.bin"
        if num_ijbc_subjects:
            first = num_identities + num_holdout_identities
            subjects = np.arange(first, first + num_ijbc_subjects)
            images, templates, pairs = _write_ijbc(
                out / "IJBC", seed, subjects, ijbc_impostors_per_genuine, workers, pool, progress
            )
            summary.images_rendered += images
            (
                summary.ijbc_subjects,
                summary.ijbc_templates,
                summary.ijbc_images,
                summary.ijbc_pairs,
            ) = (num_ijbc_subjects, templates, images, pairs)
            summary.files["ijbc"] = "IJBC"
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    summary.seconds = time.perf_counter() - start
    _write_summary(out / "summary.json", summary)
    return summary


def _write_summary(path: Path, summary: SyntheticSummary) -> None:
    record = dataclasses.asdict(summary)
    for volatile in ("seconds", "out_dir"):  # identical seeds give an identical summary.json
        record.pop(volatile)
    path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def _make_pool(workers: int):
    if workers <= 1:
        return None
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    return mp.get_context(method).Pool(workers)


def _validate(
    num_identities: int, per_identity: int, holdout: int, num_pairs: int, ijbc: int, size: int
) -> None:
    checks = [
        (num_identities >= 1, f"num_identities must be >= 1, got {num_identities}"),
        (per_identity >= 1, f"images_per_identity must be >= 1, got {per_identity}"),
        (
            holdout >= 0 and (num_pairs == 0 or holdout >= 2),
            f"num_holdout_identities must be >= 2 to build impostor pairs, got {holdout} (or set num_pairs=0)",
        ),
        (num_pairs >= 0, f"num_pairs must be >= 0, got {num_pairs}"),
        (ijbc == 0 or ijbc >= 2, f"num_ijbc_subjects must be 0 or >= 2, got {ijbc}"),
        (size >= 32, f"image_size must be >= 32, got {size}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
