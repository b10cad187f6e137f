"""Face alignment from 5 landmarks: a least-squares similarity transform + a warp.

The transform is the Umeyama (1991) least-squares similarity (rotation, uniform scale,
translation; no reflection) mapping the detected points onto the 112x112 template of
FORMATS.md. Warping uses Pillow's affine transform (bilinear); no OpenCV needed.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

# left eye, right eye, nose tip, left mouth corner, right mouth corner in a 112x112 crop
TEMPLATE_112 = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)


def estimate_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity transform taking `src` points onto `dst` points.

    Args:
        src: [K, 2] points (x, y), K >= 2; dst: [K, 2].
    Returns:
        M [2, 3] float64 with `dst ~= src @ M[:, :2].T + M[:, 2]`.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or src.shape[0] < 2:
        raise ValueError(
            f"expected two [K, 2] point arrays with K >= 2, got {src.shape} and {dst.shape}"
        )
    src_mean = src.mean(axis=0)
    dst_mean = dst.mean(axis=0)
    src_c = src - src_mean
    dst_c = dst - dst_mean
    src_var = (src_c**2).sum() / src.shape[0]
    if src_var <= 0:
        raise ValueError(f"all source points coincide ({src[0].tolist()}); cannot align")
    covariance = dst_c.T @ src_c / src.shape[0]
    u, sigma, vt = np.linalg.svd(covariance)
    sign = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[1, 1] = -1.0  # the best orthogonal map is a reflection: take the best rotation
    rotation = u @ sign @ vt
    scale = float((sigma * np.diag(sign)).sum() / src_var)
    matrix = np.empty((2, 3), dtype=np.float64)
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = dst_mean - matrix[:, :2] @ src_mean
    return matrix


def apply_transform(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply M [2, 3] to points [K, 2] -> [K, 2]."""
    points = np.asarray(points, dtype=np.float64)
    return points @ matrix[:, :2].T + matrix[:, 2]


def warp_affine(image: np.ndarray, matrix: np.ndarray, size: int = 112) -> np.ndarray:
    """Warp an image with M (input -> output pixel coordinates) into a size x size crop.

    Pixel centres are at integer coordinates, as in OpenCV's `warpAffine`; pixels that
    map outside the input are black.

    Args:
        image: uint8 [H, W, 3] (or [H, W]).
        matrix: [2, 3] mapping input (x, y) to output (x, y).
    Returns:
        uint8 [size, size, 3] (or [size, size]).
    """
    full = np.vstack([np.asarray(matrix, dtype=np.float64), [0.0, 0.0, 1.0]])
    inverse = np.linalg.inv(full)
    # Pillow samples the input at inverse(output pixel) with pixel centres at +0.5;
    # shift both sides so integer coordinates are centres.
    shift = np.array([[1.0, 0.0, -0.5], [0.0, 1.0, -0.5], [0.0, 0.0, 1.0]])
    unshift = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]])
    coefficients = (unshift @ inverse @ shift)[:2].reshape(-1)
    pil = Image.fromarray(np.ascontiguousarray(image))
    warped = pil.transform(
        (size, size), Image.AFFINE, data=tuple(coefficients), resample=Image.BILINEAR
    )
    return np.asarray(warped, dtype=np.uint8)


def align_face(image: np.ndarray, landmarks: np.ndarray, size: int = 112) -> np.ndarray:
    """Align a face to the template from its 5 landmarks.

    Args:
        image: uint8 [H, W, 3] RGB.
        landmarks: [5, 2] (or [10]) x, y of left eye, right eye, nose, mouth corners.
        size: output side; the template is scaled by size / 112.
    Returns:
        uint8 [size, size, 3].
    """
    landmarks = np.asarray(landmarks, dtype=np.float64).reshape(5, 2)
    template = TEMPLATE_112 * (size / 112.0)
    return warp_affine(image, estimate_similarity(landmarks, template), size)
