"""Issue 11's head additions on 1, 2 and 3 real gloo ranks against the plain dense
reference of tests/margin_reference_norms.py: inter-class filtering (every margin kind:
linear, ArcFace, non-linear non-targets, global target; chunked, sampled), adaface and
magface (stateful ones over several steps, the running buffers checked against the
reference's) and subcenter_arcface. 1003 classes (uneven shards); float64 to 1e-9 and,
for one case of each kind, float32 (loss to 1e-5, gradients to 1e-3 relative norm); one
spawn per world size runs every case."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from margin_reference_norms import reference_loss

from fr_trainer.distributed.shard import ClassShard
from fr_trainer.distributed.spawn import run_ranks
from fr_trainer.heads import PartialFC
from fr_trainer.heads.init import init_centres

NUM_CLASSES, DIM, BATCH, SEED = 1003, 24, 6, 13
THRESHOLD = "interclass_filtering_threshold"
CASES = [  # (margin, margin keywords, head keywords, steps)
    ("arcface", {}, {THRESHOLD: 0.3}, 1),
    ("cosface", {}, {THRESHOLD: 0.25, "chunk_size": 97}, 1),
    ("circle", {}, {THRESHOLD: 0.3}, 1),
    ("sv_arcface", {}, {THRESHOLD: 0.3, "chunk_size": 300}, 1),
    ("curricularface", {}, {THRESHOLD: 0.3}, 2),
    ("arcface", {}, {THRESHOLD: 0.3, "sample_rate": 0.3}, 1),
    ("adaface", {}, {}, 3),
    ("adaface", {"m": 0.3, "h": 0.5, "t_alpha": 0.3}, {"chunk_size": 128}, 2),
    ("adaface", {}, {"sample_rate": 0.4, THRESHOLD: 0.3}, 2),
    ("magface", {}, {}, 2),
    ("magface", {"l_m": 0.3, "u_m": 2.9, "lambda_g": 10.0}, {"chunk_size": 300}, 1),  # the fall-back
    ("magface", {"gradient": "straight_through"}, {"sample_rate": 0.5}, 1),
    ("subcenter_arcface", {}, {}, 1),
    ("subcenter_arcface", {"k": 2, "m": 2.8}, {THRESHOLD: 0.3}, 1),  # the fall-back, filtered
    ("subcenter_arcface", {"gradient": "straight_through"}, {}, 1),
]
# float32 runs one case of each kind (filtering, adaface over 3 steps, magface, sub-centres)
FP32_CASES = {0, 6, 9, 12}
TOLERANCE = {torch.float64: dict(rtol=1e-9, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-6)}
FP32_GRAD_ERROR = 1e-3  # relative Frobenius error of an fp32 gradient (a row with 1 - p_y ~ 1e-5 loses digits)


def _close(got: torch.Tensor, want: torch.Tensor, dtype, label: str) -> None:
    if dtype == torch.float64 or got.dim() == 0:
        torch.testing.assert_close(got.double(), want, **TOLERANCE[dtype], msg=_say(label))
        return
    error = float((got.double() - want).norm() / want.norm().clamp_min(1e-30))
    assert error <= FP32_GRAD_ERROR, (label, error)


def full_weight(shape_k: int = 0) -> torch.Tensor:
    if shape_k:
        return init_centres(ClassShard(NUM_CLASSES, 1, 0), DIM * shape_k, SEED).double().view(NUM_CLASSES, shape_k, DIM)
    return init_centres(ClassShard(NUM_CLASSES, 1, 0), DIM, SEED).double()


def global_batch(world_size: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of varied norms; odd rows near their class centre, and every third row also near
    another class's centre (a non-target cosine well above the filtering threshold)."""
    generator = torch.Generator().manual_seed(SEED + 100 * step)
    n = world_size * BATCH
    y = torch.randint(0, NUM_CLASSES, (n,), generator=generator)
    y[1] = y[0]
    y[-1] = NUM_CLASSES - 1
    w = F.normalize(full_weight(), dim=1)
    x = F.normalize(torch.randn(n, DIM, generator=generator, dtype=torch.float64), dim=1)
    x[1::2] = 0.3 * x[1::2] + w[y[1::2]]
    x[::3] = x[::3] + 1.2 * w[(y[::3] + 7) % NUM_CLASSES]
    norms = torch.linspace(3.0, 130.0, n, dtype=torch.float64)[torch.randperm(n, generator=generator)]
    return F.normalize(x, dim=1) * norms[:, None], y


def _rank_results(rank: int, world_size: int) -> dict:
    rows = slice(rank * BATCH, (rank + 1) * BATCH)
    out = {}
    for dtype in (torch.float64, torch.float32):
        for case, (margin, kw, head_kw, steps) in enumerate(CASES):
            if dtype == torch.float32 and case not in FP32_CASES:
                continue
            head = PartialFC(NUM_CLASSES, DIM, margin=margin, seed=SEED, **head_kw, **kw).to(dtype)
            for step in range(steps):
                x_all, y_all = global_batch(world_size, step)
                head.zero_grad()
                x = x_all[rows].to(dtype).requires_grad_()
                loss = head(x, y_all[rows])
                loss.backward()
                grad_w = head.weight.grad
                out[(str(dtype), case, step)] = {
                    "loss": loss.detach(), "grad_x": x.grad,
                    "grad_w": grad_w.to_dense() if grad_w.is_sparse else grad_w,
                    "index": None if head.last_index is None else head.last_index + head.shard.start,
                    "start": head.shard.start, "end": head.shard.end,
                    "state": {k: v.clone() for k, v in head.margin.state_dict().items()},
                }
    return out


@pytest.fixture(scope="module", params=[1, 2, 3], ids=lambda w: f"world{w}")
def results(request) -> tuple[int, list[dict]]:
    return request.param, run_ranks(_rank_results, request.param, timeout_s=300)


def _reference(margin, kw, head_kw, step, world_size, columns, state):
    x_all, y_all = global_batch(world_size, step)
    x = x_all.clone().requires_grad_()
    w = full_weight(kw.get("k", 3) if margin == "subcenter_arcface" else 0).requires_grad_()
    labels, used = y_all, w
    if columns is not None:
        labels, used = torch.searchsorted(columns, y_all), w[columns]
    loss, state = reference_loss(margin, x, used, labels, kw, head_kw.get(THRESHOLD, 0.0), state)
    loss.backward()
    return loss.detach(), x.grad, w.grad, state


def _say(label: str):
    return lambda message: f"{label}: {message}"


def _check_case(results, case: int, state_check=None) -> None:
    world_size, per_rank_all = results
    margin, kw, head_kw, steps = CASES[case]
    for dtype in (torch.float64, torch.float32) if case in FP32_CASES else (torch.float64,):
        state = {}
        for step in range(steps):
            per_rank = [r[(str(dtype), case, step)] for r in per_rank_all]
            columns = None
            if head_kw.get("sample_rate", 1.0) < 1:
                columns = torch.cat([r["index"] for r in per_rank])
            loss, gx, gw, state = _reference(margin, kw, head_kw, step, world_size, columns, state)
            label = f"{margin} {kw} {head_kw} step={step} world={world_size} {dtype}"
            for rank, r in enumerate(per_rank):
                _close(r["loss"], loss, dtype, label)
                rows = slice(rank * BATCH, (rank + 1) * BATCH)
                _close(r["grad_x"], gx[rows], dtype, label)
                _close(r["grad_w"], gw[r["start"]:r["end"]], dtype, label)
                if state_check is not None:
                    state_check(r["state"], state, per_rank[0]["state"], dtype, label)


def _filtering_cases() -> list[int]:
    return [i for i, case in enumerate(CASES) if THRESHOLD in case[2] and case[0] not in ("adaface", "magface")]


def test_interclass_filtering_is_exact_against_the_dense_reference(results) -> None:
    for case in _filtering_cases():
        _check_case(results, case)


def _adaface_state(got: dict, want: dict, rank0: dict, dtype, label: str) -> None:
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got["batch_mean"].double(), want["mean"].double(), **tol, msg=_say(label))
    torch.testing.assert_close(got["batch_std"].double(), want["std"].double(), **tol, msg=_say(label))
    assert got["batch_mean"].dtype == dtype
    assert torch.equal(got["batch_mean"], rank0["batch_mean"]) and torch.equal(got["batch_std"], rank0["batch_std"])


def test_adaface_is_exact_and_its_running_statistics_match_the_reference(results) -> None:
    for case in [i for i, c in enumerate(CASES) if c[0] == "adaface"]:
        _check_case(results, case, _adaface_state)


def test_magface_is_exact_with_its_norm_gradient_and_regulariser(results) -> None:
    for case in [i for i, c in enumerate(CASES) if c[0] == "magface"]:
        _check_case(results, case)


def test_subcenter_arcface_is_exact_with_the_max_over_sub_centres(results) -> None:
    for case in [i for i, c in enumerate(CASES) if c[0] == "subcenter_arcface"]:
        _check_case(results, case)


def test_the_filtering_batch_has_filtered_cosines_and_they_change_the_loss() -> None:
    x, y = global_batch(1, 0)
    cos = F.normalize(x, dim=1) @ F.normalize(full_weight(), dim=1).t()
    cos[torch.arange(len(y)), y] = -1
    assert int((cos > 0.3).sum()) >= 4  # the test would pass vacuously without them
    plain, _ = reference_loss("arcface", x, full_weight(), y, {}, 0.0)
    filtered, _ = reference_loss("arcface", x, full_weight(), y, {}, 0.3)
    assert float(filtered) < float(plain) - 1e-3


def test_a_filtered_centre_gets_no_gradient() -> None:
    """One row lying on centre j with another label: unfiltered, j is pushed away; with the
    filter its cosine (~1) counts as 0 and w_j gets exactly no gradient. (The target column
    is never filtered: the batch of the multi-rank test has targets above the threshold.)"""
    w = full_weight()
    j = 5
    x = (5.0 * F.normalize(w[j], dim=0) + 0.01 * torch.ones(DIM, dtype=torch.float64))[None]
    grads = {}
    for threshold in (0.0, 0.3):
        head = PartialFC(NUM_CLASSES, DIM, margin="arcface", seed=SEED,
                         interclass_filtering_threshold=threshold).double()
        head(x, torch.tensor([j + 1])).backward()
        grads[threshold] = head.weight.grad[j].abs().sum().item()
    assert grads[0.0] > 1e-3 and grads[0.3] == 0.0


def test_the_multirank_batch_has_targets_above_the_threshold() -> None:
    x, y = global_batch(2, 0)
    cos_t = F.cosine_similarity(x, full_weight()[y])
    assert int((cos_t > 0.3).sum()) >= 3


def test_option_errors_name_the_value() -> None:
    with pytest.raises(ValueError, match="interclass_filtering_threshold=1.5"):
        PartialFC(10, 4, interclass_filtering_threshold=1.5)
    with pytest.raises(ValueError, match="softmax"):
        PartialFC(10, 4, margin="softmax", interclass_filtering_threshold=0.5)
    with pytest.raises(ValueError, match="sample_rate=0.5 is not supported with 3 sub-centres"):
        PartialFC(10, 4, margin="subcenter_arcface", sample_rate=0.5)
    with pytest.raises(ValueError, match="chunk_size=3 is not supported with 3 sub-centres.*chunk_size=None"):
        PartialFC(10, 4, margin="subcenter_arcface", chunk_size=3)
    with pytest.raises(ValueError, match="k=0"):
        PartialFC(10, 4, margin="subcenter_arcface", k=0)
    with pytest.raises(ValueError, match="t_alpha=0"):
        PartialFC(10, 4, margin="adaface", t_alpha=0)
    with pytest.raises(ValueError, match="l_a=20"):
        PartialFC(10, 4, margin="magface", l_a=20.0, u_a=10.0)
