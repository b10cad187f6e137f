"""IJB-C / IJB-B evaluation: 1:1 verification and 1:N identification.

Layout (FORMATS.md), under DIR or DIR/<TARGET>:

    meta/<t>_face_tid_mid.txt          image_name template_id media_id
    meta/<t>_template_pair_label.txt   tid1 tid2 label (1 genuine, 0 impostor)
    meta/<t>_name_5pts_score.txt       image_name x1 y1 ... x5 y5 det_score
    meta/<t>_1N_gallery_*.csv          1:N galleries (G1, G2 for IJB-C; S1, S2 for IJB-B)
    meta/<t>_1N_probe_mixed.csv        1:N probes
    loose_crop/<image_name>

with `t` = "ijbc" or "ijbb". Template features: every image aligned from its 5 points,
embedded with its flip (added), multiplied by its detection score (norm kept); images
of one media averaged; medias of a template summed; the template L2-normalised. A
pair's score is the cosine of its two templates.
"""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from fr_trainer.eval.align import align_face
from fr_trainer.eval.embedder import embed_batch, iter_batches
from fr_trainer.eval.metrics import FarMode, roc_curve, tar_at_far, tar_at_far_from_roc
from fr_trainer.eval.resolution import resolution_fields

IJB_FARS: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
IJB_FPIRS: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
IJB_RANKS: tuple[int, ...] = (1, 5, 10)
TARGETS: tuple[str, ...] = ("IJBC", "IJBB")

__all__ = [
    "IJB_FARS",
    "IJB_FPIRS",
    "IJBMeta",
    "embed_ijb_images",
    "evaluate_ijb",
    "find_ijb_dir",
    "identification",
    "load_ijb_meta",
    "pair_scores",
    "read_1n_csv",
    "tar_at_far",
    "template_features",
]


@dataclass
class IJBMeta:
    """The 1:1 meta files of one IJB target.

    image_names [M] str, template_ids [M] int64, media_ids [M] int64,
    landmarks [M, 5, 2] float32, det_scores [M] float32,
    pair_t1 / pair_t2 [P] int64, pair_labels [P] bool.
    """

    directory: Path
    prefix: str
    image_names: list[str]
    template_ids: np.ndarray
    media_ids: np.ndarray
    landmarks: np.ndarray
    det_scores: np.ndarray
    pair_t1: np.ndarray
    pair_t2: np.ndarray
    pair_labels: np.ndarray


def _prefix(target: str) -> str:
    if target.upper() not in TARGETS:
        raise ValueError(f"unknown IJB target {target!r}; use one of {TARGETS}")
    return target.lower()


def find_ijb_dir(root: str | os.PathLike, target: str = "IJBC") -> Path:
    """The directory holding `meta/` and `loose_crop/`: ROOT itself or ROOT/<TARGET>."""
    root = Path(root)
    for candidate in (root, root / target.upper()):
        if (candidate / "meta").is_dir():
            return candidate
    raise FileNotFoundError(
        f"no IJB meta directory under {root}: expected {root / 'meta'} or "
        f"{root / target.upper() / 'meta'} holding {_prefix(target)}_face_tid_mid.txt etc."
    )


def _meta_file(directory: Path, prefix: str, suffix: str, content: str) -> Path:
    path = directory / "meta" / f"{prefix}_{suffix}"
    if not path.is_file():
        raise FileNotFoundError(f"missing IJB meta file {path}: expected {content} per line")
    return path


def _read_rows(path: Path, num_fields: int, content: str) -> list[list[str]]:
    rows = []
    with open(path, "r") as f:
        for line_number, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != num_fields:
                raise ValueError(
                    f"{path}, line {line_number}: {len(fields)} fields; expected {num_fields} "
                    f"({content})"
                )
            rows.append(fields)
    return rows


def _parse(path: Path, values: Iterable[str], dtype, what: str) -> np.ndarray:
    try:
        return np.asarray(list(values), dtype=dtype)
    except ValueError as error:
        raise ValueError(f"{path}: {what} must be numbers ({error})") from error


def load_ijb_meta(root: str | os.PathLike, target: str = "IJBC") -> IJBMeta:
    """Read and cross-check the three 1:1 meta files of `target` under ROOT."""
    prefix = _prefix(target)
    directory = find_ijb_dir(root, target)
    tid_path = _meta_file(
        directory, prefix, "face_tid_mid.txt", "'image_name template_id media_id'"
    )
    pair_path = _meta_file(directory, prefix, "template_pair_label.txt", "'tid1 tid2 label'")
    lmk_path = _meta_file(
        directory, prefix, "name_5pts_score.txt", "'image_name x1 y1 ... x5 y5 det_score'"
    )
    tid_rows = _read_rows(tid_path, 3, "image_name template_id media_id")
    pair_rows = _read_rows(pair_path, 3, "tid1 tid2 label")
    lmk_rows = _read_rows(lmk_path, 12, "image_name, 10 landmark coordinates, det_score")
    if len(lmk_rows) != len(tid_rows):
        raise ValueError(
            f"{lmk_path} has {len(lmk_rows)} landmark rows but {tid_path} lists "
            f"{len(tid_rows)} images; expected one landmark row per image, in the same order"
        )
    names = [r[0] for r in tid_rows]
    for i, (name, row) in enumerate(zip(names, lmk_rows)):
        if row[0] != name:
            raise ValueError(
                f"{lmk_path}, row {i + 1}: image {row[0]!r} but row {i + 1} of {tid_path} is "
                f"{name!r}; expected both files in the same image order"
            )
    lmk = _parse(lmk_path, (v for r in lmk_rows for v in r[1:]), np.float32, "landmarks and scores")
    lmk = lmk.reshape(len(lmk_rows), 11)
    pairs = _parse(
        pair_path, (v for r in pair_rows for v in r), np.int64, "template ids and labels"
    )
    pairs = pairs.reshape(len(pair_rows), 3)
    ids = _parse(tid_path, (v for r in tid_rows for v in r[1:]), np.int64, "template and media ids")
    ids = ids.reshape(len(tid_rows), 2)
    bad_labels = np.setdiff1d(pairs[:, 2], [0, 1])
    if bad_labels.size:
        raise ValueError(f"{pair_path}: labels must be 0 or 1, found {bad_labels[:5].tolist()}")
    known = np.unique(ids[:, 0])
    unknown = np.setdiff1d(np.concatenate([pairs[:, 0], pairs[:, 1]]), known)
    if unknown.size:
        raise ValueError(
            f"{pair_path}: template ids {unknown[:10].tolist()} have no image in {tid_path}"
        )
    return IJBMeta(
        directory=directory,
        prefix=prefix,
        image_names=names,
        template_ids=ids[:, 0],
        media_ids=ids[:, 1],
        landmarks=lmk[:, :10].reshape(-1, 5, 2),
        det_scores=lmk[:, 10],
        pair_t1=pairs[:, 0],
        pair_t2=pairs[:, 1],
        pair_labels=pairs[:, 2].astype(bool),
    )


# ----------------------------------------------------------------------------- features


def load_aligned(directory: Path, name: str, landmarks: np.ndarray) -> np.ndarray:
    """loose_crop/<name> aligned from its 5 points -> uint8 [112, 112, 3] RGB."""
    path = directory / "loose_crop" / name
    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"IJB image {path} listed in the meta files does not exist"
        ) from None
    return align_face(array, landmarks)


def embed_ijb_images(
    embedder: Callable[[np.ndarray], np.ndarray],
    meta: IJBMeta,
    batch_size: int = 128,
    flip: bool = True,
    num_workers: int = 4,
    progress: bool = False,
) -> np.ndarray:
    """Align and embed every image of the meta files; decode of the next batch overlaps
    the inference of the current one.

    Returns:
        float32 [M, D] image features (flip added), not weighted, not normalised.
    """
    n = len(meta.image_names)
    pool = ThreadPoolExecutor(max(1, num_workers))

    def prepare(part: slice):
        def load(i: int):
            return load_aligned(meta.directory, meta.image_names[i], meta.landmarks[i])

        return pool.map(load, range(part.start, part.stop))

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, unit="img", desc=f"embed {meta.prefix}")
    parts = list(iter_batches(n, batch_size))
    features = []
    try:
        pending = prepare(parts[0]) if parts else None
        for k, part in enumerate(parts):
            images = np.stack(list(pending))
            pending = prepare(parts[k + 1]) if k + 1 < len(parts) else None
            features.append(embed_batch(embedder, images, flip))
            if bar is not None:
                bar.update(part.stop - part.start)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        if bar is not None:
            bar.close()
    return np.concatenate(features) if features else np.zeros((0, 0), np.float32)


def template_features(
    image_features: np.ndarray,
    template_ids: np.ndarray,
    media_ids: np.ndarray,
    det_scores: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Pool image features into template features.

    feature = image_feature * det_score; mean over the images of each (template, media);
    sum over the medias of a template; L2-normalise.

    Args:
        image_features: [M, D]; template_ids, media_ids: [M] ints; det_scores: [M] or None (1).
    Returns:
        (templates [T] sorted unique ids, features [T, D] float32, unit norm).
    """
    feats = np.asarray(image_features, dtype=np.float64)
    template_ids = np.asarray(template_ids).reshape(-1)
    media_ids = np.asarray(media_ids).reshape(-1)
    if not feats.shape[0] == template_ids.size == media_ids.size:
        raise ValueError(
            f"{feats.shape[0]} image features but {template_ids.size} template ids and "
            f"{media_ids.size} media ids; expected one of each per image"
        )
    if det_scores is not None:
        det_scores = np.asarray(det_scores, dtype=np.float64).reshape(-1)
        if det_scores.size != feats.shape[0]:
            raise ValueError(f"{det_scores.size} detection scores for {feats.shape[0]} images")
        feats = feats * det_scores[:, None]
    keys = np.stack([template_ids, media_ids], axis=1)
    media_keys, inverse = np.unique(keys, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    order = np.argsort(inverse, kind="stable")
    counts = np.bincount(inverse, minlength=len(media_keys))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    media_mean = np.add.reduceat(feats[order], starts, axis=0) / counts[:, None]
    templates, template_starts = np.unique(media_keys[:, 0], return_index=True)
    pooled = np.add.reduceat(media_mean, template_starts, axis=0)
    pooled /= np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
    return templates, pooled.astype(np.float32)


def _rows_of(templates: np.ndarray, ids: np.ndarray, where: str) -> np.ndarray:
    rows = np.searchsorted(templates, ids)
    rows = np.clip(rows, 0, len(templates) - 1)
    missing = templates[rows] != ids
    if missing.any():
        raise ValueError(
            f"{where}: template ids {np.unique(ids[missing])[:10].tolist()} have no feature"
        )
    return rows


def pair_scores(
    templates: np.ndarray,
    features: np.ndarray,
    t1: np.ndarray,
    t2: np.ndarray,
    chunk: int = 65536,
) -> np.ndarray:
    """Cosine score of each template pair.

    Args:
        templates: [T] sorted ids; features: [T, D] unit-norm; t1, t2: [P] template ids.
    Returns:
        float32 [P].
    """
    r1 = _rows_of(templates, np.asarray(t1), "pair list")
    r2 = _rows_of(templates, np.asarray(t2), "pair list")
    scores = np.empty(r1.size, dtype=np.float32)
    for part in iter_batches(r1.size, chunk):
        scores[part] = np.einsum("ij,ij->i", features[r1[part]], features[r2[part]])
    return scores


# ----------------------------------------------------------------------------- 1:N


def read_1n_csv(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """A 1:N gallery/probe csv -> (template_ids [T], subject_ids [T]), one per template.

    The file has a header row with TEMPLATE_ID and SUBJECT_ID columns and one row per
    image; a template must belong to one subject.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"missing IJB 1:N file {path}: expected a csv with TEMPLATE_ID,SUBJECT_ID columns"
        )
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = [h.strip().upper() for h in next(reader, [])]
        if "TEMPLATE_ID" not in header or "SUBJECT_ID" not in header:
            raise ValueError(f"{path}: header {header} lacks TEMPLATE_ID and SUBJECT_ID columns")
        ti, si = header.index("TEMPLATE_ID"), header.index("SUBJECT_ID")
        pairs = []
        for line_number, row in enumerate(reader, 2):
            if not row:
                continue
            try:
                pairs.append((int(row[ti]), int(row[si])))
            except (ValueError, IndexError):
                raise ValueError(f"{path}, line {line_number}: bad row {row[:4]}") from None
    if not pairs:
        raise ValueError(f"{path}: no rows after the header")
    table = np.unique(np.asarray(pairs, dtype=np.int64), axis=0)
    templates, first = np.unique(table[:, 0], return_index=True)
    if len(templates) != len(table):
        dup = table[np.setdiff1d(np.arange(len(table)), first), 0]
        raise ValueError(f"{path}: templates {dup[:5].tolist()} belong to several subjects")
    return templates, table[first, 1]


def identification(
    probe_features: np.ndarray,
    probe_subjects: np.ndarray,
    gallery_features: np.ndarray,
    gallery_subjects: np.ndarray,
    ranks: Sequence[int] = IJB_RANKS,
    fpirs: Sequence[float] = IJB_FPIRS,
) -> dict:
    """Open-set 1:N identification of probe templates against one gallery.

    A subject's score is its best gallery template's cosine. Mated probes (subject in the
    gallery) give rank-k: the mate's rank is 1 + the number of subjects scoring strictly
    higher. Non-mated probes give the threshold: at FPIR f at most floor(f * n_nonmated)
    of their best scores exceed it; TPIR is the fraction of mated probes whose mate is at
    rank 1 with a score above that threshold.

    Args:
        probe_features [Q, D], gallery_features [G, D]: unit norm; *_subjects: [Q], [G] ints.
    Returns:
        {"rank": {k: rate}, "tpir_at_fpir": {f: tpir}, "num_mated": int, "num_nonmated": int}
    """
    probe_subjects = np.asarray(probe_subjects).reshape(-1)
    gallery_subjects = np.asarray(gallery_subjects).reshape(-1)
    subjects, gallery_inverse = np.unique(gallery_subjects, return_inverse=True)
    order = np.argsort(gallery_inverse, kind="stable")
    starts = np.concatenate([[0], np.cumsum(np.bincount(gallery_inverse.reshape(-1)))[:-1]])
    scores = np.asarray(probe_features, np.float64) @ np.asarray(gallery_features, np.float64).T
    subject_scores = np.maximum.reduceat(scores[:, order], starts, axis=1)  # [Q, U]
    column = np.clip(np.searchsorted(subjects, probe_subjects), 0, len(subjects) - 1)
    mated = subjects[column] == probe_subjects
    mate_score = subject_scores[mated, column[mated]]
    mate_rank = 1 + (subject_scores[mated] > mate_score[:, None]).sum(axis=1)
    nonmated_best = (
        np.sort(subject_scores[~mated].max(axis=1))[::-1] if (~mated).any() else np.zeros(0)
    )
    n_mated, n_nonmated = int(mated.sum()), int((~mated).sum())
    rank = {int(k): float((mate_rank <= k).mean()) if n_mated else float("nan") for k in ranks}
    tpir = {}
    for f in fpirs:
        allowed = int(np.floor(float(f) * n_nonmated + 1e-9))
        if n_mated == 0 or (n_nonmated == 0 and f < 1):
            tpir[float(f)] = float("nan")
            continue
        threshold = nonmated_best[allowed] if allowed < n_nonmated else -np.inf
        tpir[float(f)] = float(((mate_rank == 1) & (mate_score > threshold)).mean())
    return {"rank": rank, "tpir_at_fpir": tpir, "num_mated": n_mated, "num_nonmated": n_nonmated}


def find_1n_files(meta: IJBMeta) -> tuple[dict[str, Path], Path] | None:
    """({gallery name: csv}, probe csv), or None when the target has no 1:N gallery files."""
    meta_dir = meta.directory / "meta"
    galleries = {
        p.stem.rsplit("_", 1)[-1]: p
        for p in sorted(meta_dir.glob(f"{meta.prefix}_1N_gallery_*.csv"))
    }
    if not galleries:
        return None
    probe = meta_dir / f"{meta.prefix}_1N_probe_mixed.csv"
    if not probe.is_file():
        raise FileNotFoundError(
            f"missing IJB 1:N probe file {probe} (galleries {sorted(galleries)} exist); expected a "
            "csv with TEMPLATE_ID,SUBJECT_ID columns"
        )
    return galleries, probe


def evaluate_1n(
    meta: IJBMeta, templates: np.ndarray, features: np.ndarray, **kwargs
) -> dict[str, dict] | None:
    """Identification per gallery from the 1:N csv files; None when there are none."""
    found = find_1n_files(meta)
    if found is None:
        return None
    galleries, probe_path = found
    probe_t, probe_s = read_1n_csv(probe_path)
    probe_f = features[_rows_of(templates, probe_t, str(probe_path))]
    results = {}
    for name, path in galleries.items():
        gallery_t, gallery_s = read_1n_csv(path)
        gallery_f = features[_rows_of(templates, gallery_t, str(path))]
        results[name] = identification(probe_f, probe_s, gallery_f, gallery_s, **kwargs)
    return results


# ----------------------------------------------------------------------------- driver


def roc_for_plot(
    fpr: np.ndarray, tpr: np.ndarray, points: int = 2000
) -> tuple[np.ndarray, np.ndarray]:
    """A thinned ROC for plotting: the upper envelope at `points` log-spaced FARs."""
    positive = fpr > 0
    if not positive.any():
        return fpr, tpr
    grid = np.logspace(np.log10(fpr[positive].min()), 0, points)
    # the largest tpr with fpr <= g, for every grid value g (fpr is non-decreasing)
    index = np.searchsorted(fpr, grid, side="right") - 1
    best = np.maximum.accumulate(tpr)
    return grid, best[np.clip(index, 0, len(best) - 1)]


def evaluate_ijb(
    embedder: Callable[[np.ndarray], np.ndarray],
    root: str | os.PathLike,
    target: str = "IJBC",
    out_dir: str | os.PathLike | None = None,
    batch_size: int = 128,
    flip: bool = True,
    use_det_score: bool = True,
    far_mode: FarMode = "max",
    fars: Sequence[float] = IJB_FARS,
    one_to_n: bool = True,
    num_workers: int = 4,
    progress: bool = False,
    model_name: str = "model",
) -> dict:
    """The full IJB evaluation: meta, embed, pool, 1:1 TAR@FAR, 1:N; optional outputs.

    With `out_dir`, writes `<t>_scores.npz` (scores, labels, pair template ids, image
    features, template ids and features), `<t>_result.json` and `<t>_roc.png`.
    Returns:
        {"target", "tar_at_far", "far_mode", "num_images", "num_templates", "num_pairs",
         "identification" (per gallery or None), "seconds": {...}, "files": {...}}
    """
    timings = {}
    start = time.perf_counter()
    meta = load_ijb_meta(root, target)
    timings["meta"] = time.perf_counter() - start
    t0 = time.perf_counter()
    image_features = embed_ijb_images(embedder, meta, batch_size, flip, num_workers, progress)
    timings["embed"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    templates, features = template_features(
        image_features,
        meta.template_ids,
        meta.media_ids,
        meta.det_scores if use_det_score else None,
    )
    scores = pair_scores(templates, features, meta.pair_t1, meta.pair_t2)
    fpr, tpr, _ = roc_curve(scores, meta.pair_labels)
    tar = tar_at_far_from_roc(fpr, tpr, fars, far_mode)
    timings["verify_1_1"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ident = evaluate_1n(meta, templates, features) if one_to_n else None
    timings["identify_1_n"] = time.perf_counter() - t0
    result = {
        "target": target.upper(),
        "tar_at_far": tar,
        "far_mode": far_mode,
        "num_images": len(meta.image_names),
        "num_templates": len(templates),
        "num_pairs": int(scores.size),
        **resolution_fields(fars, int((~np.asarray(meta.pair_labels, dtype=bool)).sum())),
        "identification": ident,
        "files": {},
    }
    if out_dir is not None:
        t0 = time.perf_counter()
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        scores_path = out / f"{meta.prefix}_scores.npz"
        np.savez(
            scores_path,
            scores=scores,
            labels=meta.pair_labels,
            t1=meta.pair_t1,
            t2=meta.pair_t2,
            image_features=image_features,
            templates=templates,
            template_features=features,
        )
        result["files"]["scores"] = str(scores_path)
        from fr_trainer.eval.plots import plot_roc

        plot_path = out / f"{meta.prefix}_roc.png"
        plot_roc(
            {model_name: roc_for_plot(fpr, tpr)},
            plot_path,
            title=f"{target.upper()} 1:1 ROC",
            min_far=result["smallest_resolvable_far"],
        )
        result["files"]["roc"] = str(plot_path)
        timings["write"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - start
    result["seconds"] = timings
    if out_dir is not None:
        json_path = Path(out_dir) / f"{meta.prefix}_result.json"
        result["files"]["result"] = str(json_path)
        json_path.write_text(json.dumps(to_jsonable(result), indent=2))
    return result


def to_jsonable(obj):
    """dict keys and numpy scalars made JSON-friendly (float keys become strings)."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj
