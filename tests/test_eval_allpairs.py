"""All-pairs TAR@FAR: exact against a brute force over every pair, ties included."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fr_trainer.eval import allpairs
from fr_trainer.eval.allpairs import (
    all_pairs_tar_at_far,
    all_pairs_verification,
    allowed_false_accepts,
    block_size_for_budget,
)
from fr_trainer.eval.metrics import tar_at_far

FARS = (0.0, 1e-6, 1e-4, 1e-3, 3e-3, 1e-2, 0.05, 0.1, 0.3, 0.5, 0.9, 1.0)


def brute_force(emb: np.ndarray, labels: np.ndarray, normalize: bool) -> tuple[np.ndarray, np.ndarray]:
    """Every pair i < j: (scores, genuine)."""
    x = emb.astype(np.float64)
    if normalize:
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
    i, j = np.triu_indices(len(x), k=1)
    return (x[i] * x[j]).sum(axis=1), labels[i] == labels[j]


def integer_set(n: int, d: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Small-integer embeddings: every score is an exact integer in fp32 (many ties)."""
    rng = np.random.default_rng(seed)
    centres = rng.integers(-2, 3, (classes, d))
    labels = rng.integers(0, classes, n)
    emb = centres[labels] + rng.integers(-1, 2, (n, d))
    return emb.astype(np.float32), labels


@pytest.mark.parametrize(
    "budget,sample_rows",
    [(1 << 30, None), (24 * 37 * 37, None), (24 * 50 * 50, 2), (24 * 64 * 64, 0)],
    ids=["one-block", "many-blocks", "poor-sample", "no-sample"],
)
def test_exact_against_brute_force_with_ties(budget: int, sample_rows: int | None) -> None:
    emb, labels = integer_set(300, 6, 7, seed=1)
    scores, genuine = brute_force(emb, labels, normalize=False)
    assert len(np.unique(scores)) < 60  # heavy ties
    result = all_pairs_verification(emb, labels, FARS, memory_budget=budget, normalize=False, sample_rows=sample_rows)
    expected = tar_at_far(scores, genuine, FARS, mode="max")
    impostors = np.sort(scores[~genuine])[::-1]
    for far in FARS:
        r = result.results[far]
        assert r.tar == expected[far], (far, r.tar, expected[far])
        m = allowed_false_accepts(far, impostors.size)
        if m < impostors.size:
            assert r.threshold == impostors[m]
            assert r.achieved_far == (impostors > r.threshold).sum() / impostors.size <= far
            assert r.tar == (scores[genuine] > r.threshold).mean()


def test_float_embeddings_match_brute_force_of_the_same_gemm() -> None:
    """Random unit vectors: brute force from the very fp32 scores the blocks compute."""
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 40, 500)
    centres = rng.standard_normal((40, 32))
    emb = (centres[labels] + 1.2 * rng.standard_normal((500, 32))).astype(np.float32)
    x = torch.from_numpy(emb)
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    full = torch.mm(x, x.T).add_(0.0).numpy()  # one block: the same GEMM as the pass
    i, j = np.triu_indices(500, k=1)
    scores, genuine = full[i, j].astype(np.float64), labels[i] == labels[j]
    fars = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
    result = all_pairs_verification(emb, labels, fars, memory_budget=1 << 30)
    assert result.block_size == 500
    assert result.tar_at_far() == tar_at_far(scores, genuine, fars, mode="max")
    impostors = np.sort(scores[~genuine])[::-1]
    for far in fars:
        assert result.results[far].threshold == impostors[allowed_false_accepts(far, impostors.size)]


def test_block_size_follows_the_memory_budget() -> None:
    assert block_size_for_budget(24 * 1000 * 1000, 10**6) == 1000
    assert block_size_for_budget(24 * 1000 * 1000 + 23, 10**6) == 1000
    assert block_size_for_budget(1 << 40, 300) == 300
    result = all_pairs_verification(*integer_set(200, 4, 5, seed=3), memory_budget=24 * 30 * 30, normalize=False)
    assert result.block_size == 30  # 7 x 7 blocks' upper triangle, each at most 30 x 30 scores
    with pytest.raises(ValueError, match="too small"):
        block_size_for_budget(10, 100)


def test_tail_far_below_one_over_pairs_is_flagged_not_resolvable() -> None:
    emb, labels = integer_set(120, 5, 4, seed=4)
    result = all_pairs_verification(emb, labels, (1e-9, 1e-2), normalize=False)
    m = result.num_impostors
    assert result.smallest_resolvable_far == 1 / m
    assert not result.results[1e-9].resolvable and result.results[1e-9].false_accepts_allowed == 0
    assert result.results[1e-2].resolvable


def test_one_pass_when_the_sample_predicts_and_two_when_it_cannot() -> None:
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 100, 3000)
    emb = rng.standard_normal((3000, 16)).astype(np.float32)
    fars = (1e-5, 1e-3, 1e-1)
    good = all_pairs_verification(emb, labels, fars, memory_budget=24 * 1000 * 1000, sample_rows=300)
    assert good.passes == 1
    bad = all_pairs_verification(emb, labels, fars, memory_budget=24 * 1000 * 1000, sample_rows=0)
    assert bad.passes == 2
    assert bad.tar_at_far() == good.tar_at_far()


def test_wrapper_and_errors() -> None:
    emb, labels = integer_set(50, 4, 3, seed=6)
    assert set(all_pairs_tar_at_far(emb, labels, (1e-2,), normalize=False)) == {1e-2}
    with pytest.raises(ValueError, match="outside"):
        all_pairs_tar_at_far(emb, labels, (2.0,))
    with pytest.raises(ValueError, match="labels"):
        all_pairs_tar_at_far(emb, labels[:-1])
    bad = emb.copy()
    bad[0, 0] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        all_pairs_tar_at_far(bad, labels)


def test_float_from_bins_roundtrip() -> None:
    for value in (0.0, 0.3, -0.3, 1.0, -1.0, 1e-30, -7.5):
        bits = int(np.array([value], np.float32).view(np.int32)[0])
        assert allpairs.float_from_bins((bits >> 16) + 32768, bits & 0xFFFF) == np.float32(value)


def test_negative_zero_scores_equal_positive_zero(monkeypatch) -> None:
    """A GEMM may give -0.0 for a zero dot product; it must tie with +0.0 (one recount pass)."""
    emb, labels = integer_set(150, 4, 5, seed=7)
    scores, genuine = brute_force(emb, labels, normalize=False)
    impostors = np.sort(scores[~genuine])[::-1]
    zeros = np.flatnonzero(impostors == 0)
    assert zeros.size > 100
    far = float(zeros[-3]) / impostors.size  # the threshold is 0.0, near the end of the run of zeros
    real_mm = torch.mm

    def mixed_zeros(a, b, out=None):
        result = real_mm(a, b, out=out)
        flat = result.view(-1)
        where = torch.nonzero(flat == 0).reshape(-1)
        flat[where[::2]] = -0.0  # half of the zeros come out negative
        return result

    monkeypatch.setattr(torch, "mm", mixed_zeros)
    fars = (far, 0.05, 0.5)
    result = all_pairs_verification(
        emb, labels, fars, memory_budget=24 * 40 * 40, normalize=False, sample_rows=150
    )  # the whole sample: bulk bins (low-bit histograms), not the value-keeping tail
    assert result.results[far].threshold == 0.0
    assert result.results[far].achieved_far == (impostors > 0).sum() / impostors.size
    assert result.passes >= 2
    assert result.tar_at_far() == tar_at_far(scores, genuine, fars, mode="max")
