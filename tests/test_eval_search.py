"""Exact chunked top-k search against brute force; chunks follow the memory budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fr_trainer.eval.search import (
    GROUP_STRIDE,
    SearchPlan,
    _chunk_topk,
    brute_force_topk,
    merge_topk,
    plan_chunks,
    topk_search,
)


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


@pytest.mark.parametrize("values", ["integers", "normal"])
def test_the_grouped_chunk_topk_equals_a_full_sort_ties_included(values: str) -> None:
    rng = np.random.default_rng(5)
    width, k = GROUP_STRIDE * 60, 12  # 60 groups >= 4 (k + 1): the grouped path
    if values == "integers":  # ties among the top scores in every row, at the group boundary in some
        block = rng.integers(0, 1000, (64, width)).astype(np.float32)
        group_max = -np.sort(-block.reshape(64, GROUP_STRIDE, 60).max(axis=1), axis=1)
        boundary_ties = int((group_max[:, k] == group_max[:, k - 1]).sum())
        assert 0 < boundary_ties < 64  # both the grouped rows and the redone rows are tested
    else:
        block = rng.standard_normal((64, width)).astype(np.float32)
    got_values, got_cols = _chunk_topk(torch.from_numpy(block), k, 1000)
    # a chunk's equal scores come in any order; the merge puts them in index order
    empty = torch.empty(64, 0)
    got_values, got_cols = merge_topk(got_values, got_cols, empty, empty.long(), k)
    order = np.lexsort((np.broadcast_to(np.arange(width), block.shape), -block.astype(np.float64)), axis=1)[:, :k]
    np.testing.assert_array_equal(got_values.numpy(), np.take_along_axis(block, order, axis=1))
    np.testing.assert_array_equal(got_cols.numpy(), order + 1000)


def test_search_in_whole_groups_with_a_ragged_last_chunk_equals_brute_force() -> None:
    rng = np.random.default_rng(6)
    probes = rng.integers(-2, 3, (20, 6)).astype(np.float32)
    gallery = rng.integers(-2, 3, (2100, 6)).astype(np.float32)  # chunks 960, 960, 180
    scores, index = topk_search(probes, gallery, 10, plan=SearchPlan(20, GROUP_STRIDE * 60, 0))
    ref_scores, ref_index = brute_force_topk(probes, gallery, 10)
    np.testing.assert_array_equal(scores, ref_scores)
    np.testing.assert_array_equal(index, ref_index)
    assert plan_chunks(3530, 1_000_000, 512, 10, 1 << 30).gallery_chunk % GROUP_STRIDE == 0


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


def test_a_memmap_is_read_at_the_right_bytes_through_views_offsets_and_dtypes(tmp_path) -> None:
    from fr_trainer.eval.gallery_reader import GalleryReader, memmap_file_position

    rows = np.random.default_rng(7).standard_normal((300, 8))
    for dtype, header in ((np.float32, 0), (np.float16, 4096 + 24)):  # a header before the rows
        path = tmp_path / f"gallery_{np.dtype(dtype).name}.bin"
        path.write_bytes(b"\0" * header + rows.astype(dtype).tobytes())
        disk = np.memmap(path, dtype=dtype, mode="r", shape=rows.shape, offset=header)
        view = disk[100:250]  # a view of the memmap: its own first byte
        assert memmap_file_position(view) == (str(path), header + 100 * 8 * np.dtype(dtype).itemsize)
        with GalleryReader(view, torch.device("cpu")) as reader:
            for a, b in ((0, 64), (64, 150), (10, 11)):
                expected = rows[100 + a:100 + b].astype(dtype).astype(np.float32)
                np.testing.assert_array_equal(reader.read(a, b).numpy(), expected)
    assert memmap_file_position(rows) is None and memmap_file_position(disk[:, :4]) is None  # not C-contiguous rows


def test_a_gallery_file_shorter_than_its_memmap_is_named(tmp_path) -> None:
    from fr_trainer.eval.gallery_reader import GalleryReader

    path = tmp_path / "gallery.f32"
    np.zeros((100, 4), np.float32).tofile(path)
    disk = np.memmap(path, dtype=np.float32, mode="r", shape=(100, 4))
    with open(path, "r+b") as f:
        f.truncate(50 * 4 * 4)  # cut after the memmap was opened
    with GalleryReader(disk, torch.device("cpu")) as reader, pytest.raises(ValueError, match="gallery.f32.*shorter"):
        reader.read(40, 80)
