"""Alignment: the similarity estimate recovers known transforms; the warp puts points where
the transform says."""

from __future__ import annotations

import numpy as np
import pytest

from fr_trainer.eval.align import (
    TEMPLATE_112,
    align_face,
    apply_transform,
    estimate_similarity,
    warp_affine,
)


def similarity(scale: float, angle_deg: float, tx: float, ty: float) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    return np.array(
        [
            [scale * np.cos(a), -scale * np.sin(a), tx],
            [scale * np.sin(a), scale * np.cos(a), ty],
        ]
    )


def invert(matrix: np.ndarray) -> np.ndarray:
    full = np.vstack([matrix, [0, 0, 1]])
    return np.linalg.inv(full)[:2]


@pytest.mark.parametrize(
    "params",
    [(1.0, 0.0, 0.0, 0.0), (2.3, 17.0, 40.0, -12.5), (0.6, -35.0, 3.0, 90.0), (1.7, 170.0, 5, 5)],
)
def test_recovers_template_from_known_similarity(params):
    to_loose = similarity(*params)  # template -> detected points in the loose crop
    detected = apply_transform(to_loose, TEMPLATE_112)
    matrix = estimate_similarity(detected, TEMPLATE_112)
    np.testing.assert_allclose(apply_transform(matrix, detected), TEMPLATE_112, atol=1e-9)
    np.testing.assert_allclose(matrix, invert(to_loose), atol=1e-9)


def test_least_squares_matches_hand_normal_equations():
    """With noisy points the Umeyama estimate equals the linear least-squares solution of
    x' = a x - b y + tx, y' = b x + a y + ty (no reflection case)."""
    rng = np.random.default_rng(0)
    src = apply_transform(similarity(1.4, 12.0, 20, 30), TEMPLATE_112) + rng.normal(0, 1.5, (5, 2))
    dst = TEMPLATE_112
    rows, rhs = [], []
    for (x, y), (u, v) in zip(src, dst):
        rows.append([x, -y, 1, 0])
        rhs.append(u)
        rows.append([y, x, 0, 1])
        rhs.append(v)
    a, b, tx, ty = np.linalg.lstsq(np.array(rows), np.array(rhs), rcond=None)[0]
    expected = np.array([[a, -b, tx], [b, a, ty]])
    np.testing.assert_allclose(estimate_similarity(src, dst), expected, atol=1e-9)


def test_mirrored_points_give_a_rotation_not_a_reflection():
    mirrored = TEMPLATE_112 * np.array([-1.0, 1.0]) + np.array([112.0, 0.0])
    matrix = estimate_similarity(mirrored, TEMPLATE_112)
    assert np.linalg.det(matrix[:, :2]) > 0


def test_bad_points_are_rejected():
    with pytest.raises(ValueError, match=r"\[K, 2\]"):
        estimate_similarity(np.zeros((5, 3)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="coincide"):
        estimate_similarity(np.ones((5, 2)), TEMPLATE_112)


def test_warp_integer_translation_is_exact():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (140, 130, 3), dtype=np.uint8)
    shift = np.array([[1.0, 0.0, -7.0], [0.0, 1.0, -11.0]])  # output = input - (7, 11)
    np.testing.assert_array_equal(warp_affine(image, shift, 112), image[11:123, 7:119])


def test_align_face_moves_marked_points_onto_the_template():
    to_loose = similarity(1.8, 25.0, 60.0, 20.0)
    landmarks = apply_transform(to_loose, TEMPLATE_112)
    yy, xx = np.mgrid[0:260, 0:260]
    image = np.zeros((260, 260, 3), dtype=np.uint8)
    for k, (x, y) in enumerate(landmarks):  # a bright gaussian blob per point, one channel each
        blob = np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 3.0**2))
        image[..., k % 3] = np.maximum(image[..., k % 3], (255 * blob).astype(np.uint8))
    aligned = align_face(image, landmarks).astype(np.float64)
    assert aligned.shape == (112, 112, 3)
    ay, ax = np.mgrid[0:112, 0:112]
    for k, (tx, ty) in enumerate(TEMPLATE_112):
        window = (np.abs(ax - tx) < 6) & (np.abs(ay - ty) < 6)
        weight = aligned[..., k % 3] * window
        centroid = np.array([(weight * ax).sum(), (weight * ay).sum()]) / weight.sum()
        np.testing.assert_allclose(centroid, [tx, ty], atol=0.3)
