"""Exact chunked top-k search against brute force; chunks follow the memory budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fr_trainer.eval.search import SearchPlan, brute_force_topk, merge_topk, plan_chunks, topk_search


def unit_rows(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("plan", [None, SearchPlan(7, 33, 0), SearchPlan(100, 1000, 0)], ids=["auto", "small", "one"])
def test_equals_brute_force(plan: SearchPlan | None) -> None:
    probes, gallery = unit_rows(40, 24, 0), unit_rows(900, 24, 1)
    scores, index = topk_search(probes, gallery, 10, plan=plan)
    ref_scores, ref_index = brute_force_topk(probes, gallery, 10)
    np.testing.assert_array_equal(index, ref_index)
    np.testing.assert_allclose(scores, ref_scores, rtol=0, atol=1e-6)
    assert scores.dtype == np.float32 and index.dtype == np.int64


def test_ties_take_the_smaller_index_exactly() -> None:
    rng = np.random.default_rng(2)
    probes = rng.integers(-2, 3, (30, 5)).astype(np.float32)
    gallery = rng.integers(-2, 3, (500, 5)).astype(np.float32)  # integer scores: exact, many ties
    ref_scores, ref_index = brute_force_topk(probes, gallery, 12)
    for plan in (SearchPlan(4, 17, 0), SearchPlan(30, 500, 0)):
        scores, index = topk_search(probes, gallery, 12, plan=plan)
        np.testing.assert_array_equal(scores, ref_scores)
        np.testing.assert_array_equal(index, ref_index)


def test_memmap_fp16_gallery_and_normalize(tmp_path) -> None:
    gallery = np.random.default_rng(3).standard_normal((700, 16)).astype(np.float16)
    path = tmp_path / "gallery.f16"
    disk = np.memmap(path, dtype=np.float16, mode="w+", shape=gallery.shape)
    disk[:] = gallery
    disk.flush()
    disk = np.memmap(path, dtype=np.float16, mode="r", shape=gallery.shape)
    probes = unit_rows(9, 16, 4)
    scores, index = topk_search(probes, disk, 5, normalize=True, memory_budget=200_000)
    g = gallery.astype(np.float64)
    ref_scores, ref_index = brute_force_topk(probes, g / np.linalg.norm(g, axis=1, keepdims=True), 5)
    np.testing.assert_array_equal(index, ref_index)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)


def test_chunks_are_computed_from_the_budget() -> None:
    plan = plan_chunks(3530, 1_000_000, 512, 10, 1 << 30)
    assert plan.probe_chunk == 3530
    assert plan.bytes_per_step <= 1 << 30
    assert (
        plan_chunks(3530, 1_000_000, 512, 10, 1 << 30).gallery_chunk
        > plan_chunks(3530, 1_000_000, 512, 10, 1 << 28).gallery_chunk
    )
    small = plan_chunks(100_000, 50_000, 64, 10, 4 << 20)
    assert small.probe_chunk < 100_000 and small.bytes_per_step <= 4 << 20
    with pytest.raises(ValueError, match="too small"):
        plan_chunks(10, 100, 512, 10, 1000)


def test_search_respects_the_budget_it_was_given(monkeypatch) -> None:
    """Every GEMM's score block is at most the planned size."""
    seen = []
    real_mm = torch.mm

    def spy(a, b, out=None):
        seen.append(a.shape[0] * b.shape[1])
        return real_mm(a, b, out=out)

    monkeypatch.setattr(torch, "mm", spy)
    probes, gallery = unit_rows(50, 8, 5), unit_rows(3000, 8, 6)
    budget = 64_000
    plan = plan_chunks(50, 3000, 8, 3, budget)
    topk_search(probes, gallery, 3, memory_budget=budget)
    assert len(seen) > 1 and max(seen) <= plan.probe_chunk * plan.gallery_chunk
    assert plan.bytes_per_step <= budget


def test_k_larger_than_gallery_pads() -> None:
    scores, index = topk_search(unit_rows(2, 4, 7), unit_rows(3, 4, 8), 5)
    assert (index[:, 3:] == -1).all() and np.isneginf(scores[:, 3:]).all()
    assert sorted(index[0, :3]) == [0, 1, 2]


def test_merge_is_order_independent() -> None:
    s = torch.tensor([[1.0, 2.0, 2.0, 0.5]])
    i = torch.tensor([[3, 9, 1, 0]])
    merged = merge_topk(s[:, :2], i[:, :2], s[:, 2:], i[:, 2:], 3)
    assert merged[1].tolist() == [[1, 9, 3]]


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="D=4"):
        topk_search(unit_rows(2, 4, 0), unit_rows(3, 5, 0), 1)
    with pytest.raises(ValueError, match="k must"):
        topk_search(unit_rows(2, 4, 0), unit_rows(3, 4, 0), 0)
